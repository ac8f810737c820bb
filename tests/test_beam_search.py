"""LLM.beam_search: width 1 is greedy, wider beams are sorted by score and equal
transformers' beam search on a tiny model."""

import pytest
import torch
from conftest import hf_greedy, random_prompts, tiny_llm, token_prompts

from kiln import BeamSearchParams, SamplingParams


def test_width_one_is_greedy(tiny_llama):
    folder, hf = tiny_llama
    prompts = random_prompts(2, seed=60)
    llm = tiny_llm(folder)
    outs = llm.beam_search(token_prompts(prompts),
                           BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))
    greedy = llm.generate(token_prompts(prompts),
                          SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)
    for prompt, out, g in zip(prompts, outs, greedy):
        (seq,) = out.sequences
        assert seq.tokens == prompt + g.outputs[0].token_ids == prompt + hf_greedy(hf, prompt, 6)


def test_width_four_matches_transformers_and_is_sorted(tiny_llama):
    folder, hf = tiny_llama
    prompt = random_prompts(1, seed=61)[0]
    llm = tiny_llm(folder)
    (out,) = llm.beam_search(token_prompts([prompt]),
                             BeamSearchParams(beam_width=4, max_tokens=5, ignore_eos=True))
    scores = [s.cum_logprob for s in out.sequences]
    assert len(scores) == 4 and scores == sorted(scores, reverse=True)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                                                                            dtype=torch.long),
                          num_beams=4, num_return_sequences=4, max_new_tokens=5,
                          min_new_tokens=5, do_sample=False, length_penalty=1.0,
                          early_stopping=True, return_dict_in_generate=True,
                          pad_token_id=0)
    assert [s.tokens for s in out.sequences] == ref.sequences.tolist()
    for seq in out.sequences:  # the score is transformers' logprob of the continuation
        with torch.no_grad():
            logprobs = hf(torch.tensor([seq.tokens])).logits[0].log_softmax(-1)
        total = sum(logprobs[i - 1, seq.tokens[i]].item()
                    for i in range(len(prompt), len(seq.tokens)))
        assert seq.cum_logprob == pytest.approx(total, abs=1e-3)
    for seq in out.sequences:  # each step's logprob entry holds the chosen token
        chosen = [entry[t].logprob for t, entry in zip(seq.tokens[len(prompt):], seq.logprobs)]
        assert sum(chosen) == pytest.approx(seq.cum_logprob, abs=1e-5)


def test_bad_beam_params(tiny_llama):
    with pytest.raises(ValueError, match="beam_width"):
        BeamSearchParams(beam_width=0, max_tokens=4)
    llm = tiny_llm(tiny_llama[0])
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search(token_prompts([[1, 2]]), SamplingParams())
