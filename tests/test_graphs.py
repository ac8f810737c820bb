"""Bucket planning, and the static buffers a CUDA graph replays from (checked on the CPU:
a decode batch copied into padded static buffers must give the same hidden states)."""

import pytest
import torch
from conftest import random_prompts, tiny_llm

from kiln import SamplingParams
from kiln.graphs.buckets import decode_sizes, padded_size, plan_sizes
from kiln.graphs.cuda_graph import StaticBuffers
from kiln.models import attention_context


def test_plan_sizes_cover_the_budget():
    assert plan_sizes(8, 48) == [1, 2, 4, 8, 16, 32, 48]
    assert plan_sizes(4, 4) == [1, 2, 4]
    assert decode_sizes([1, 2, 4, 8, 16, 32, 48], 5) == [1, 2, 4, 8]
    assert padded_size([1, 2, 4, 8], 3) == 4 and padded_size([1, 2, 4, 8], 8) == 8
    with pytest.raises(ValueError, match="9 tokens exceed the largest compiled size 8"):
        padded_size([1, 2, 4, 8], 9)


@torch.no_grad()
def test_padded_static_buffers_reproduce_a_decode_step(tiny_llama):
    llm = tiny_llm(tiny_llama[0])
    engine, runner = llm.engine, llm.engine.runner
    for prompt in random_prompts(3, seed=40, min_len=5, max_len=30):
        engine.add_request(None, prompt, SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # prefill; each request now has one token to decode
    batch = engine.scheduler.schedule()
    assert batch.num_decodes == 3
    inputs = runner.prepare_inputs(batch)
    model = runner.model
    with attention_context(inputs.meta):
        expected = model(inputs.input_ids, inputs.positions)
    buffers = StaticBuffers.allocate(8, max_blocks_per_seq=8, sink_block=runner.sink_block,
                                     block_size=runner.block_size, device=runner.device)
    buffers.copy_from(inputs.input_ids, inputs.positions, inputs.meta, size=8)
    with attention_context(buffers.metadata(8)):
        padded = model(buffers.input_ids[:8], buffers.positions[:8])
    torch.testing.assert_close(padded[:3], expected, rtol=0, atol=1e-6)
    assert torch.equal(buffers.slot_mapping[3:8],
                       torch.full((5,), runner.sink_block * runner.block_size))
    engine.abort_all()
