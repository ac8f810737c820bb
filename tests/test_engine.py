"""Scheduling paths (batch sizes, chunked prefill, preemption, prefix caching) must not change
greedy tokens: all are compared with transformers on the same weights."""

import pytest
from conftest import assert_all_blocks_free, scheduling_workload, tiny_llm, token_prompts

from kiln import SamplingParams

MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return scheduling_workload(tiny_llama[1], seed=3, max_new_tokens=MAX_TOKENS)


def run(folder, prompts, **kwargs):
    llm = tiny_llm(folder, **kwargs)
    outs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
    assert_all_blocks_free(llm)
    return llm, [o.outputs[0].token_ids for o in outs]


def test_batch_of_one_and_large_batch(tiny_llama, reference):
    prompts, expected = reference
    _, single = run(tiny_llama[0], prompts[:1], max_num_seqs=1)
    assert single == expected[:1]
    llm, many = run(tiny_llama[0], prompts)
    assert many == expected
    assert len(prompts) >= 16
    runner = llm.engine.runner  # on CPU the decodes above ran kiln's decode kernel
    assert (runner.decode_kernel is not None) == (runner.device.type == "cpu")


def test_max_num_seqs_one_serves_requests_in_turn(tiny_llama, reference):
    prompts, expected = reference
    _, out = run(tiny_llama[0], prompts[:5], max_num_seqs=1)
    assert out == expected[:5]


def test_chunked_prefill(tiny_llama, reference):
    prompts, expected = reference
    llm, out = run(tiny_llama[0], prompts, max_num_batched_tokens=7)
    assert out == expected


def test_preemption_keeps_greedy_tokens(tiny_llama, reference):
    prompts, expected = reference
    # 64 blocks of 4 tokens: 256 tokens for 24 requests of up to 65 tokens each.
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # K/V, layers, block_size, kv heads, head_dim, fp32
    llm, out = run(tiny_llama[0], prompts, block_size=4, kv_cache_memory=64 * per_block,
                   max_model_len=128)
    assert llm.engine.runner.num_blocks == 64
    assert llm.engine.scheduler.num_preemptions > 0
    assert out == expected


@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_prefix_caching_on_and_off(tiny_llama, reference, enable_prefix_caching):
    prompts, expected = reference
    llm = tiny_llm(tiny_llama[0], enable_prefix_caching=enable_prefix_caching)
    # Run twice: the second pass finds every prompt's full blocks in the cache.
    for _ in range(2):
        outs = llm.generate(token_prompts(prompts), GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert_all_blocks_free(llm)
    hits = llm.engine.block_manager.num_prefix_hits
    assert (hits > 0) == enable_prefix_caching


def test_prefix_cache_hits_within_one_batch(tiny_llama, reference):
    prompts, expected = reference
    llm = tiny_llm(tiny_llama[0], max_num_seqs=1)  # one at a time: later ones reuse the stem
    outs = llm.generate(token_prompts(prompts[-4:]), GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[-4:]
    assert llm.engine.block_manager.num_prefix_hits >= 3 * 32


def test_outputs_in_input_order_with_vllm_fields(tiny_llama, reference):
    prompts, _ = reference
    llm = tiny_llm(tiny_llama[0])
    outs = llm.generate(token_prompts(prompts[:3]), GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == prompt and out.prompt is None and out.finished
        c = out.outputs[0]
        assert c.index == 0 and len(c.token_ids) == MAX_TOKENS and c.text == ""
        assert c.cumulative_logprob is None and c.logprobs is None
        assert c.finish_reason == "length" and c.stop_reason is None
    assert len({o.request_id for o in outs}) == 3


def test_max_model_len_ends_generation_with_length(tiny_llama):
    llm = tiny_llm(tiny_llama[0], max_model_len=20)
    out = llm.generate({"prompt_token_ids": list(range(15))},
                       SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].finish_reason == "length"
