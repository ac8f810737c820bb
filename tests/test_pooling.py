"""Pooling models: MiniLM embeddings and scores against transformers, a tiny cross-encoder
against transformers' logits, and the errors around them."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from kiln import LLM, PoolingParams, SamplingParams
from kiln.resolve import EMBEDDING_MODEL, embedded_model

TEXTS = ["The cat sits on the mat.", "A dog runs in the park!",
         "Inference engines serve language models.", "Paris is the capital of France.",
         "naïve café — unicode survives tokenisation", "short"]


@pytest.fixture(scope="module")
def minilm():
    # Offline, the hub id resolves to the embedded wheel. Compiled for two sizes only, to
    # keep the suite's cold compile short.
    return LLM(EMBEDDING_MODEL, max_num_batched_tokens=512,
               compilation_config={"sizes": [128, 512]})


@pytest.fixture(scope="module")
def reference_embeddings():
    from transformers import AutoModel, AutoTokenizer

    folder = embedded_model(EMBEDDING_MODEL)
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_minilm_embeddings_match_transformers(minilm, reference_embeddings):
    outs = minilm.embed(TEXTS)
    assert [len(o.outputs.embedding) for o in outs] == [384] * len(TEXTS)
    ours = torch.stack([o.outputs.data for o in outs])
    cosine = F.cosine_similarity(ours, reference_embeddings, dim=-1)
    assert cosine.min().item() >= 0.9999
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    raw = minilm.encode(TEXTS[:2], PoolingParams(normalize=False))
    assert raw[0].outputs.data.norm().item() != pytest.approx(1.0, abs=1e-3)


def test_score_is_the_cosine_of_the_embeddings(minilm, reference_embeddings):
    one_to_many = minilm.score(TEXTS[0], TEXTS[1:])
    expected = (reference_embeddings[1:] @ reference_embeddings[0]).tolist()
    assert [o.outputs.score for o in one_to_many] == pytest.approx(expected, abs=1e-3)
    pairwise = minilm.score(TEXTS[:3], TEXTS[3:])
    expected = [(reference_embeddings[i] @ reference_embeddings[i + 3]).item()
                for i in range(3)]
    assert [o.outputs.score for o in pairwise] == pytest.approx(expected, abs=1e-3)
    with pytest.raises(ValueError, match="equal length; got 2 and 3"):
        minilm.score(TEXTS[:2], TEXTS[:3])
    with pytest.raises(ValueError, match="longer than max_model_len"):
        minilm.embed("word " * 600)
    with pytest.raises(ValueError, match="pooling model"):
        minilm.generate("hello", SamplingParams(max_tokens=2))
    assert minilm.score("a", "a")[0].outputs.score == pytest.approx(1.0, abs=1e-5)


def test_minilm_compiled_once_and_equal_to_eager(minilm):
    counters = minilm.pooler.runner.graph_runner.backend.counters
    before = counters.num_compiles
    eager = LLM(EMBEDDING_MODEL, enforce_eager=True)
    texts = TEXTS * 20  # 240 texts: several batches of up to 512 tokens
    ours = torch.stack([o.outputs.data for o in minilm.embed(texts)])
    reference = torch.stack([o.outputs.data for o in eager.embed(texts)])
    assert torch.allclose(ours, reference, atol=1e-5)
    assert counters.num_traces + counters.num_traces_restored == 1
    assert counters.num_compiles == before  # serving compiles nothing
    assert minilm.pooler.runner.graph_runner.steps  # the compiled path ran


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_tiny_cross_encoder_matches_transformers_logits(tmp_path, enforce_eager):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    minilm_folder = embedded_model(EMBEDDING_MODEL)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        shutil.copy(minilm_folder / name, tmp_path / name)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, num_labels=1)
    hf = BertForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    pairs = [("How tall is the tower?", "The tower is 300 metres tall."),
             ("Who wrote it?", "Bananas are yellow."), ("a", "b")]
    with torch.no_grad():
        batch = tok([a for a, _ in pairs], [b for _, b in pairs], padding=True,
                    return_tensors="pt")
        logits = hf(**batch).logits[:, 0]
    compilation = {"sizes": [64], "cache_dir": str(tmp_path / "cache")}
    llm = LLM(str(tmp_path), enforce_eager=enforce_eager, max_model_len=64,
              max_num_batched_tokens=64, compilation_config=compilation)
    first, second = [a for a, _ in pairs], [b for _, b in pairs]
    probs = [o.outputs.score for o in llm.score(first, second)]
    assert probs == pytest.approx(logits.sigmoid().tolist(), abs=1e-4)
    raw = [o.outputs.score for o in llm.score(first, second, PoolingParams(activation=False))]
    assert raw == pytest.approx(logits.tolist(), abs=1e-4)
    with pytest.raises(ValueError, match="cross-encoder"):
        llm.embed("no embeddings here")
    if not enforce_eager:  # a second engine rebuilds the encoder graph from the cache's record
        again = LLM(str(tmp_path), max_model_len=64, max_num_batched_tokens=64,
                    compilation_config=compilation)
        counters = again.pooler.runner.graph_runner.backend.counters
        assert (counters.num_traces, counters.num_traces_restored) == (0, 1)
        assert [o.outputs.score for o in again.score(first, second)] == probs


def test_pooling_on_a_generation_model_is_refused(tiny_llama):
    llm = LLM(str(tiny_llama[0]), skip_tokenizer_init=True, enforce_eager=True,
              kv_cache_memory=16 << 20)
    with pytest.raises(ValueError, match="no pooling applies"):
        llm.embed({"prompt_token_ids": [1, 2, 3]})
    with pytest.raises(ValueError, match="cannot generate"):
        LLM(EMBEDDING_MODEL, runner="generate")


@pytest.mark.parametrize("enforce_eager", [True, False])
def test_decoder_last_token_pooling_matches_transformers(tiny_llama, enforce_eager):
    """runner='pooling' on a decoder: the normalised final hidden state of each prompt's last
    token, as transformers computes it, through kiln's engine (compiled or eager)."""
    from conftest import random_prompts

    folder, hf = tiny_llama
    prompts = random_prompts(6, seed=3)
    prompts.append(prompts[0] + [7, 8, 9])  # shares a cached prefix with the first
    with torch.no_grad():
        expected = torch.stack([hf.model(torch.tensor([p])).last_hidden_state[0, -1]
                                for p in prompts])
    llm = LLM(str(folder), runner="pooling", skip_tokenizer_init=True,
              enforce_eager=enforce_eager, kv_cache_memory=16 << 20)
    outs = llm.embed([{"prompt_token_ids": p} for p in prompts])
    ours = torch.stack([o.outputs.data for o in outs])
    assert torch.allclose(ours, F.normalize(expected, dim=-1), atol=1e-4)
    raw = llm.encode({"prompt_token_ids": prompts[1]}, PoolingParams(normalize=False))
    assert torch.allclose(raw[0].outputs.data, expected[1], atol=1e-4)
    with pytest.raises(ValueError, match="runs as a pooling model"):
        llm.generate({"prompt_token_ids": [1, 2]})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.embed({"prompt_token_ids": [1, 999]})
    assert llm.embed({"prompt_token_ids": [5, 6]})[0].outputs.data.norm().item() == \
        pytest.approx(1.0, abs=1e-5)
