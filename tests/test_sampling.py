"""Sampling: seeds, greedy equivalences, filters, penalties, logprobs, stop conditions."""

import torch
from conftest import assert_all_blocks_free, random_prompts, tiny_llm, token_prompts

from kiln import SamplingParams
from kiln.runtime.sampler import exponential_noise


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_seeded_sampling_is_reproducible_across_runs_and_batches(tiny_llama):
    prompts = random_prompts(6, seed=7)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=123, ignore_eos=True)
    llm = tiny_llm(tiny_llama[0])
    alone = tokens(llm.generate(token_prompts(prompts[:1]), params, use_tqdm=False))
    again = tokens(llm.generate(token_prompts(prompts[:1]), params, use_tqdm=False))
    # Same request inside a batch of others with different settings.
    others = [SamplingParams(temperature=0.7, top_k=5, max_tokens=7, ignore_eos=True)] * 5
    mixed = tokens(llm.generate(token_prompts(prompts), [params] + others, use_tqdm=False))
    fresh = tokens(tiny_llm(tiny_llama[0]).generate(token_prompts(prompts[:1]), params,
                                                    use_tqdm=False))
    assert alone == again == mixed[:1] == fresh
    assert_all_blocks_free(llm)


def test_different_seeds_differ_and_unseeded_follows_llm_seed(tiny_llama):
    prompts = token_prompts(random_prompts(1, seed=8))
    llm = tiny_llm(tiny_llama[0])
    draws = {tuple(tokens(llm.generate(prompts, SamplingParams(
        temperature=1.5, max_tokens=10, seed=s, ignore_eos=True), use_tqdm=False))[0])
        for s in range(5)}
    assert len(draws) == 5
    unseeded = SamplingParams(temperature=1.5, max_tokens=10, ignore_eos=True)
    a = tokens(tiny_llm(tiny_llama[0], seed=1).generate(prompts, unseeded, use_tqdm=False))
    b = tokens(tiny_llm(tiny_llama[0], seed=1).generate(prompts, unseeded, use_tqdm=False))
    assert a == b


def test_top_k_one_and_temperature_zero_equal_greedy(tiny_llama):
    prompts = token_prompts(random_prompts(4, seed=9))
    llm = tiny_llm(tiny_llama[0])
    greedy = tokens(llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8,
                                                         ignore_eos=True), use_tqdm=False))
    top1 = tokens(llm.generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=8,
                                                       seed=5, ignore_eos=True), use_tqdm=False))
    # Greedy rows in a batch whose other rows sample at random (a batch of greedy rows alone
    # builds no random settings at all).
    hot = SamplingParams(temperature=1.5, max_tokens=8, seed=6, ignore_eos=True)
    mixed = tokens(llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=8,
                                                         ignore_eos=True), hot] * 2,
                                use_tqdm=False))
    assert greedy == top1
    assert mixed[0::2] == greedy[0::2]


def test_top_k_restricts_every_token_to_the_k_most_likely(tiny_llama):
    """With logprobs=k, the sampled token must be one of the k returned (rank <= k)."""
    llm = tiny_llm(tiny_llama[0])
    outs = llm.generate(token_prompts(random_prompts(4, seed=10)),
                        SamplingParams(temperature=2.0, top_k=3, logprobs=3, max_tokens=12,
                                       seed=0, ignore_eos=True), use_tqdm=False)
    for out in outs:
        for token, entry in zip(out.outputs[0].token_ids, out.outputs[0].logprobs):
            assert entry[token].rank <= 3


def test_noise_is_exponential_and_depends_on_seed_and_step():
    seeds = torch.tensor([1, 1, 2], dtype=torch.int64)
    steps = torch.tensor([0, 1, 0], dtype=torch.int64)
    noise = exponential_noise(seeds, steps, 50000)
    assert (noise > 0).all()
    assert abs(noise.mean().item() - 1.0) < 0.02
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert torch.equal(noise[0], exponential_noise(seeds[:1], steps[:1], 50000)[0])


def test_noise_is_never_zero():
    """A zero would turn a masked token's probability 0 into 0 / 0 = NaN, which argmax picks
    (the old 24-bit uniform reached 1.0 about once per 2**24 draws: ~3 times in this sweep)."""
    steps = torch.zeros(100, dtype=torch.int64)
    for start in range(0, 1000, 100):
        seeds = torch.arange(start, start + 100, dtype=torch.int64)
        assert (exponential_noise(seeds, steps, 49152) > 0).all()


def test_sampling_frequencies_follow_softmax(tiny_llama):
    """Many seeded one-token draws: the empirical distribution matches softmax(logits/T)."""
    _, hf = tiny_llama
    prompt = random_prompts(1, seed=11)[0]
    with torch.no_grad():
        probs = (hf(torch.tensor([prompt])).logits[0, -1] / 0.5).softmax(-1)
    llm = tiny_llm(tiny_llama[0])
    n = 400
    params = [SamplingParams(temperature=0.5, max_tokens=1, seed=s) for s in range(n)]
    outs = llm.generate(token_prompts([prompt] * n), params, use_tqdm=False)
    counts = torch.bincount(torch.tensor([o.outputs[0].token_ids[0] for o in outs]),
                            minlength=probs.numel()).float()
    assert (counts / n - probs).abs().max().item() < 0.08


def test_logprobs_match_log_softmax_of_transformers(tiny_llama):
    folder, hf = tiny_llama
    prompt = random_prompts(1, seed=12)[0]
    llm = tiny_llm(folder)
    out = llm.generate({"prompt_token_ids": prompt},
                       SamplingParams(temperature=0.8, seed=3, logprobs=2, max_tokens=6,
                                      ignore_eos=True), use_tqdm=False)[0].outputs[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out.token_ids])).logits[0].log_softmax(-1)
    total = 0.0
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert abs(entry[token].logprob - row[token].item()) <= 1e-3
        top = row.topk(2)
        for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
            assert entry[t].rank == rank and abs(entry[t].logprob - v) <= 1e-3
        total += entry[token].logprob
    assert abs(out.cumulative_logprob - total) < 1e-6


def test_penalties_change_greedy_choice_as_vllm_defines(tiny_llama):
    """Repetition penalty divides positive logits of seen tokens: a strong one stops the tiny
    model's greedy loops, and the chosen token is the argmax of the penalised logits."""
    folder, hf = tiny_llama
    prompt = random_prompts(1, seed=13)[0]
    llm = tiny_llm(folder)
    params = SamplingParams(temperature=0, max_tokens=8, repetition_penalty=3.0,
                            frequency_penalty=0.5, presence_penalty=0.5, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0]
    ids = list(prompt)
    with torch.no_grad():
        for token in out.token_ids:
            logits = hf(torch.tensor([ids])).logits[0, -1]
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[ids] = True
            counts = torch.bincount(torch.tensor(ids[len(prompt):], dtype=torch.long),
                                    minlength=logits.numel()).float()
            logits = torch.where(seen, torch.where(logits > 0, logits / 3, logits * 3), logits)
            logits = logits - 0.5 * counts - 0.5 * (counts > 0).float()
            assert token == int(logits.argmax())
            ids.append(token)


def test_stop_token_ids_and_min_tokens(tiny_llama):
    folder, _ = tiny_llama
    llm = tiny_llm(folder)
    prompt = {"prompt_token_ids": random_prompts(1, seed=14)[0]}
    free = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0].token_ids
    stop_at = free[3]
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                              stop_token_ids=[stop_at]),
                       use_tqdm=False)[0].outputs[0]
    first = free.index(stop_at)
    assert out.token_ids == free[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    # min_tokens keeps the stop token from being sampled until enough tokens exist.
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                              stop_token_ids=[stop_at], min_tokens=first + 2),
                       use_tqdm=False)[0].outputs[0]
    assert stop_at not in out.token_ids[:first + 2]


def test_garbage_in_reused_memory_does_not_reach_attention(tiny_llama):
    """Attention reads whole blocks and masks unwritten slots; the cache must not start with
    whatever a freed allocation left behind (NaN survives masking)."""
    llm = tiny_llm(tiny_llama[0])
    for layer in llm.engine.runner.model.attention_layers():
        assert torch.count_nonzero(layer.kv_cache) == 0


def test_n_completions_are_seeded_reproducible_and_share_the_prompt(tiny_llama):
    prompt = {"prompt_token_ids": random_prompts(1, seed=15, min_len=40, max_len=40)[0]}
    params = SamplingParams(n=4, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    llm = tiny_llm(tiny_llama[0], enable_prefix_caching=True)
    out = llm.generate(prompt, params, use_tqdm=False)
    assert len(out) == 1 and [c.index for c in out[0].outputs] == [0, 1, 2, 3]
    draws = [tuple(c.token_ids) for c in out[0].outputs]
    assert len(set(draws)) == 4  # different seeds per completion
    # The siblings took the prompt's two full 16-token blocks from the cache.
    assert llm.engine.block_manager.num_prefix_hits >= 3 * 32
    again = tiny_llm(tiny_llama[0]).generate(prompt, params, use_tqdm=False)
    assert [tuple(c.token_ids) for c in again[0].outputs] == draws
    # Completion i with seed s is the single completion with seed s + i.
    third = llm.generate(prompt, SamplingParams(temperature=1.0, max_tokens=8, seed=9,
                                                ignore_eos=True), use_tqdm=False)
    assert tuple(third[0].outputs[0].token_ids) == draws[2]
    assert_all_blocks_free(llm)


def test_n_greedy_completions_are_identical(tiny_llama):
    llm = tiny_llm(tiny_llama[0])
    out = llm.generate({"prompt_token_ids": [5, 6, 7]},
                       SamplingParams(n=3, temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1
    assert out.finished


def test_n_completions_under_preemption_finish(tiny_llama):
    """n > 1 with a cache so small that requests are preempted: every completion finishes
    with all its tokens."""
    per_block = 2 * 2 * 4 * 2 * 16 * 4
    llm = tiny_llm(tiny_llama[0], block_size=4, kv_cache_memory=24 * per_block,
                   max_model_len=64)
    prompts = [{"prompt_token_ids": p} for p in random_prompts(3, seed=16, min_len=20,
                                                                max_len=30)]
    outs = llm.generate(prompts, SamplingParams(n=3, temperature=0.9, seed=1, max_tokens=20,
                                                ignore_eos=True), use_tqdm=False)
    assert all(len(c.token_ids) == 20 for o in outs for c in o.outputs)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_all_blocks_free(llm)
    # More completions than the cache can ever hold at once (12 x 13 blocks > 24) are not an
    # error: they take turns, and each draws what it would draw with room for all.
    params = SamplingParams(n=12, temperature=0.9, seed=2, max_tokens=20, ignore_eos=True)
    small = llm.generate(prompts[0], params, use_tqdm=False)[0].outputs
    large = tiny_llm(tiny_llama[0], block_size=4).generate(prompts[0], params,
                                                           use_tqdm=False)[0].outputs
    assert [c.token_ids for c in small] == [c.token_ids for c in large]
    assert_all_blocks_free(llm)


def test_logit_bias_and_allowed_token_ids(tiny_llama):
    llm = tiny_llm(tiny_llama[0])
    prompts = token_prompts(random_prompts(3, seed=40))
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    plain = tokens(llm.generate(prompts, greedy, use_tqdm=False))
    forced = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                            logit_bias={"17": 100.0})  # JSON-style string keys are accepted
    assert tokens(llm.generate(prompts, forced, use_tqdm=False)) == [[17] * 6] * 3
    first = plain[0][0]
    avoid = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True,
                           logit_bias={first: -100.0})
    assert tokens(llm.generate(prompts[:1], avoid, use_tqdm=False))[0][0] != first
    allowed = SamplingParams(temperature=1.5, max_tokens=12, seed=3, ignore_eos=True,
                             allowed_token_ids=[5, 9, 200])
    outs = tokens(llm.generate(prompts, [allowed, greedy, allowed], use_tqdm=False))
    assert all(set(t) <= {5, 9, 200} for t in (outs[0], outs[2]))
    assert outs[1] == plain[1]  # a neighbour in the batch keeps its own settings
    assert_all_blocks_free(llm)


def test_truncate_prompt_tokens_keeps_the_last_tokens(tiny_llama):
    llm = tiny_llm(tiny_llama[0], max_model_len=64)
    long_prompt = random_prompts(1, seed=41, min_len=100, max_len=100)[0]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                            truncate_prompt_tokens=20)
    out = llm.generate(token_prompts([long_prompt]), params, use_tqdm=False)[0]
    assert out.prompt_token_ids == long_prompt[-20:]
    direct = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    assert out.outputs[0].token_ids == tokens(llm.generate(
        token_prompts([long_prompt[-20:]]), direct, use_tqdm=False))[0]
    to_max = SamplingParams(max_tokens=1, truncate_prompt_tokens=-1)
    assert len(llm.generate(token_prompts([long_prompt]), to_max,
                            use_tqdm=False)[0].prompt_token_ids) == 64


def test_prompt_logprobs_match_transformers_under_chunking_and_preemption(tiny_llama):
    """Prompt logprobs are transformers' log_softmax at every prompt position (the first
    is None), whether the prompt is prefilled at once, in chunks, or again after preemption."""
    folder, hf = tiny_llama
    prompts = random_prompts(4, seed=42, min_len=20, max_len=40)
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2, ignore_eos=True)
    with torch.no_grad():
        refs = [hf(torch.tensor([p])).logits[0].log_softmax(-1) for p in prompts]
    per_block = 2 * 2 * 4 * 2 * 16 * 4
    for llm in (tiny_llm(folder), tiny_llm(folder, max_num_batched_tokens=7),
                tiny_llm(folder, block_size=4, kv_cache_memory=12 * per_block,
                         max_model_len=48)):
        outs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
        for prompt, ref, out in zip(prompts, refs, outs):
            assert out.prompt_logprobs[0] is None
            assert len(out.prompt_logprobs) == len(prompt)
            for pos, entry in enumerate(out.prompt_logprobs[1:], 1):
                row = ref[pos - 1]
                token = prompt[pos]
                assert abs(entry[token].logprob - row[token].item()) <= 1e-3
                assert entry[token].rank == int((row > row[token]).sum()) + 1
                top = row.topk(2)
                for rank, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist()),
                                              1):
                    assert entry[t].rank == rank and abs(entry[t].logprob - v) <= 1e-3
        assert_all_blocks_free(llm)
    plain = tiny_llm(folder).generate(token_prompts(prompts[:1]), SamplingParams(max_tokens=1),
                                      use_tqdm=False)[0]
    assert plain.prompt_logprobs is None


def test_output_kind_does_not_change_offline_results(tiny_llama):
    from kiln.runtime.sampling_params import RequestOutputKind

    llm = tiny_llm(tiny_llama[0])
    prompts = token_prompts(random_prompts(2, seed=43))
    results = [tokens(llm.generate(prompts, SamplingParams(temperature=0, max_tokens=5,
                                                           ignore_eos=True, output_kind=kind),
                                   use_tqdm=False)) for kind in RequestOutputKind]
    assert results[0] == results[1] == results[2] and all(len(t) == 5 for t in results[0])
