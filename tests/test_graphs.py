"""Bucket planning, the static buffers a CUDA graph replays from (checked on the CPU: a
decode batch copied into padded static buffers must give the same hidden states), and the
chain of a one-token step's recorded layer calls."""

import pytest
import torch
from conftest import random_prompts, tiny_llm

from kiln import SamplingParams
from kiln.compiler.inductor import Replay
from kiln.graphs.buckets import decode_sizes, padded_size, plan_sizes
from kiln.graphs.chain import LayerChain
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


def _recorded_layers(positions: torch.Tensor, count: int) -> list[Replay]:
    """`count` layers recorded as a step would leave them: each (positions, hidden,
    residual) -> (hidden + residual + positions, 2 hidden), the next taking those outputs."""
    hidden, residual = torch.zeros(1, 4), torch.zeros(1, 4)
    replays = []
    for _ in range(count):
        out = (torch.empty(1, 4), torch.empty(1, 4))
        steps = [(torch.add, (hidden, residual), {}, out[0]),
                 (torch.Tensor.add_, (out[0], positions), {}, None),
                 (torch.mul, (hidden, 2.0), {}, out[1])]
        replays.append(Replay(None, (positions, hidden, residual), steps, out))
        hidden, residual = out
    return replays


def _expected(hidden, residual, positions, count):
    for _ in range(count):
        hidden, residual = hidden + residual + positions, 2 * hidden
    return hidden, residual


def test_a_chain_runs_every_layers_recorded_steps_at_the_first_call():
    """graphs/chain.py: the first layer's call runs all layers; each later call given the
    previous outputs returns its own; a call given anything else stops the chain there, and
    the calls replay one by one."""
    positions = torch.tensor([3.0])
    replays = _recorded_layers(positions, 3)
    layers = [torch.nn.Identity() for _ in replays]
    recorded = {layer: (replay, lambda args, r=replay: r.copies(args) == [])
                for layer, replay in zip(layers, replays)}
    calls_of = {layer: (lambda args, r=replay: r(*args)) for layer, replay in
                zip(layers, replays)}
    hidden, residual = torch.randn(1, 4), torch.randn(1, 4)
    calls, args = [], (positions, hidden, residual)
    for layer in layers:  # a step replaying one layer at a time, as recorded
        out = calls_of[layer](args)
        calls.append((layer, args, out))
        args = (positions, *out)
    chain = LayerChain.link(calls, recorded, calls_of)
    assert chain is not None and chain.layers == layers

    hidden, residual = torch.randn(1, 4), torch.randn(1, 4)
    out = chain.start((positions, hidden, residual))
    for layer in layers[1:]:
        out = chain.ran_ahead(layer, (positions, *out))
    assert chain.next == 0 and chain.num_runs == 1
    for got, want in zip(out, _expected(hidden, residual, positions, 3)):
        torch.testing.assert_close(got, want)

    out = chain.start((positions, hidden, residual))
    other = (positions, out[0] + 1, out[1])  # not what the first layer returned
    assert chain.ran_ahead(layers[1], other) is None and chain.next == 0
    out = calls_of[layers[1]](other)
    assert chain.ran_ahead(layers[2], (positions, *out)) is None
    out = calls_of[layers[2]]((positions, *out))
    for got, want in zip(out, _expected(other[1], other[2], positions, 2)):
        torch.testing.assert_close(got, want)

    # A later call that took a fresh tensor, or a layer called twice, cannot be chained.
    fresh = [(layers[0], calls[0][1], calls[0][2]),
             (layers[1], (positions, calls[0][2][0].clone(), calls[0][2][1]), calls[1][2])]
    assert LayerChain.link(fresh, recorded, calls_of) is None
    assert LayerChain.link(calls[:1] * 2, recorded, calls_of) is None
