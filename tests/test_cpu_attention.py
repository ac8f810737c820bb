"""The CPU attention kernel against the torch path it replaces, on caches whose blocks are
scattered and sequences whose lengths end mid-block."""

import pytest
import torch

from kiln.models.attention import (
    AttentionMetadata,
    attention_context,
    paged_attention,
    paged_attention_step,
)
from kiln.models.cpu_attention import DecodeKernel, bind_recorded, load_decode_kernel


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    built = load_decode_kernel(tmp_path_factory.mktemp("kernels"))
    assert built is not None, "g++ (which Inductor needs on CPU too) should build the kernel"
    return built


def _batch(seq_lens: list[int], num_prefill_tokens: int, num_heads: int, num_kv_heads: int,
           head_dim: int, block_size: int = 4, seed: int = 0, prefill_start: int = 0):
    """A step of one-token decodes (contexts `seq_lens`) plus, when `num_prefill_tokens`,
    one prefill chunk starting at position `prefill_start` (the positions before it cached),
    over a cache of shuffled blocks."""
    gen = torch.Generator().manual_seed(seed)
    prefill_end = prefill_start + num_prefill_tokens
    lens = seq_lens + ([prefill_end] if num_prefill_tokens else [])
    width = max(-(-n // block_size) for n in lens)
    num_blocks = width * len(lens) + 3
    blocks = torch.randperm(num_blocks, generator=gen)
    tables = blocks[:width * len(lens)].view(len(lens), width)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    query_lens = [1] * len(seq_lens) + ([num_prefill_tokens] if num_prefill_tokens else [])
    positions = [n - 1 for n in seq_lens] + list(range(prefill_start, prefill_end))
    token_to_seq = [i for i, q in enumerate(query_lens) for _ in range(q)]
    slots = [int(tables[s, p // block_size]) * block_size + p % block_size
             for s, p in zip(token_to_seq, positions)]
    offsets = [0] * len(seq_lens) + list(range(num_prefill_tokens))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots), seq_lens=torch.tensor(lens),
        query_lens=torch.tensor(query_lens), block_tables=tables,
        token_to_seq=torch.tensor(token_to_seq), token_offsets=torch.tensor(offsets),
        token_lens=torch.tensor(positions) + 1,
        num_decodes=len(seq_lens), max_query_len=num_prefill_tokens)
    num_tokens = len(slots)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    return q, k, v, cache, meta


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [
    (4, 4, 64),  # no grouping, the unrolled 64 path
    (9, 3, 64),  # SmolLM2's grouping
    (8, 2, 128),
    (4, 2, 16),  # a head size without its own unrolled path
])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("num_prefill_tokens,prefill_start", [(0, 0), (11, 0), (6, 9)])
def test_kernel_matches_torch_path(kernel, num_heads, num_kv_heads, head_dim, sliding_window,
                                   num_prefill_tokens, prefill_start):
    """Decodes, and a prefill chunk's tokens as rows of their own, each over its sequence up
    to its own position (a chunk that starts its sequence, or one after cached positions)."""
    q, k, v, cache, meta = _batch([1, 3, 4, 9, 17], num_prefill_tokens, num_heads, num_kv_heads,
                                  head_dim, prefill_start=prefill_start)
    scale = head_dim**-0.5
    expected_cache = cache.clone()
    expected = paged_attention(q, k, v, expected_cache, meta, scale, sliding_window)
    meta.decode_kernel = kernel
    got = paged_attention(q, k, v, cache, meta, scale, sliding_window)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache, expected_cache)  # the kernel wrote the new keys and values


def test_padded_decode_step_with_strided_inputs(kernel):
    """A decode-only step padded to a compiled size, its q/k/v slices of one projection
    output (rows farther apart than their heads) as compiled layers hand them over: the
    kernel reads them in place, writes only the real tokens and returns zero padded rows."""
    q, k, v, cache, meta = _batch([2, 5, 11], 0, 6, 2, 16, seed=2)
    qkv = torch.cat([x.flatten(1) for x in (q, k, v)], dim=1)
    qkv = torch.cat([qkv, torch.randn(2, qkv.shape[1])])  # two padding rows
    q, k, v = (part.unflatten(1, (-1, 16)) for part in qkv.split([96, 32, 32], dim=1))
    expected_cache = cache.clone()
    expected = paged_attention(q[:3], k[:3], v[:3], expected_cache, meta, 0.25)
    meta.decode_kernel = kernel
    with attention_context(meta):
        got = paged_attention_step(q, k, v, cache, 0.25, 0)
    torch.testing.assert_close(got[:3], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[3:], torch.zeros(2, 6, 16))
    assert torch.equal(cache, expected_cache)


def test_kernel_in_a_batch_with_a_prefill_and_one_thread(kernel):
    """Decodes and a prefill chunk in one step, with one thread, as many as the machine has,
    and more."""
    q, k, v, cache, meta = _batch([6, 13], 7, 6, 2, 32, seed=1)
    expected_cache = cache.clone()
    expected = paged_attention(q, k, v, expected_cache, meta, 0.2)
    meta.decode_kernel = kernel
    threads = torch.get_num_threads()
    try:
        for n in (1, threads, threads + 3):
            torch.set_num_threads(n)
            got_cache = cache.clone()
            got = paged_attention(q, k, v, got_cache, meta, 0.2)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            assert torch.equal(got_cache, expected_cache)  # the prefill's keys too
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("seq_lens", [[1], [2], [37], [5, 70]])
@pytest.mark.parametrize("sliding_window", [None, 9])
def test_sequences_split_over_positions(kernel, seq_lens, sliding_window):
    """Fewer sequences than threads: each is split into one part per thread (some parts
    empty when a context is shorter than the thread count), the parts merged."""
    q, k, v, cache, meta = _batch(seq_lens, 0, 9, 3, 64, seed=2)
    expected_cache = cache.clone()
    expected = paged_attention(q, k, v, expected_cache, meta, 0.125, sliding_window)
    meta.decode_kernel = kernel
    threads = torch.get_num_threads()
    try:
        for n in (2, 3, 8):
            torch.set_num_threads(n)
            got_cache = cache.clone()
            got = paged_attention(q, k, v, got_cache, meta, 0.125, sliding_window)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            assert torch.equal(got_cache, expected_cache)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("seq_lens,num_heads,num_kv_heads,head_dim", [
    ([5, 2, 9], 4, 2, 16),
    ([37], 9, 3, 64),  # one sequence: split over positions
    ([1, 3, 4, 9, 17], 8, 2, 128),
])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("num_prefill_tokens", [0, 13])
def test_bfloat16_kernel_matches_the_float32_path_rounded(kernel, seq_lens, num_heads,
                                                          num_kv_heads, head_dim,
                                                          sliding_window, num_prefill_tokens):
    """bfloat16 queries, keys and values, sums in float32: the torch path on the same values
    in float32, rounded to bfloat16 at the end; the new keys and values land in the cache
    bit for bit."""
    q, k, v, cache, meta = _batch(seq_lens, num_prefill_tokens, num_heads, num_kv_heads,
                                  head_dim, seed=4)
    q, k, v, cache = (x.to(torch.bfloat16) for x in (q, k, v, cache))
    expected_cache = cache.float()
    scale = head_dim**-0.5
    expected = paged_attention(q.float(), k.float(), v.float(), expected_cache, meta, scale,
                               sliding_window).to(torch.bfloat16)
    meta.decode_kernel = kernel
    got = paged_attention(q, k, v, cache, meta, scale, sliding_window)
    assert got.dtype == torch.bfloat16
    # The float sums differ in order only: nearly every value rounds alike, none differs by
    # more than one step of bfloat16.
    steps = (got.view(torch.int16).int() - expected.view(torch.int16).int()).abs()
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.01
    assert torch.equal(cache.float(), expected_cache)


def test_a_failed_build_falls_back(tmp_path, monkeypatch, caplog):
    """As in a process that has not loaded the kernel yet (once loaded it is kept: a
    registered op kernel cannot be unloaded)."""
    import kiln.models.cpu_attention as cpu_attention
    import kiln.models.cpu_build as cpu_build

    monkeypatch.setattr(cpu_attention, "_kernel", [])
    monkeypatch.setattr(cpu_build, "COMPILER", str(tmp_path / "no-such-compiler"))
    assert load_decode_kernel(tmp_path) is None
    assert "torch path" in caplog.text


@pytest.mark.parametrize("num_prefill_tokens", [0, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_op_attends_every_step_in_its_cpu_kernel(kernel, num_prefill_tokens, dtype):
    """Once the library is loaded, `kiln::paged_attention` has a CPU kernel: within a step,
    prefill chunks in it or not, it attends by itself, never calling the torch path (nor,
    through it, the kernel), with the same result."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("kiln::paged_attention", "CPU")
    calls = []

    class Counting(DecodeKernel):
        def __call__(self, *args):
            calls.append(args)
            return super().__call__(*args)

    q, k, v, cache, meta = _batch([3, 8, 21], num_prefill_tokens, 9, 3, 64, seed=5)
    q, k, v, cache = (x.to(dtype) for x in (q, k, v, cache))
    meta.decode_kernel = Counting(kernel.library)
    expected_cache = cache.clone()
    with attention_context(meta):
        expected = paged_attention_step(q, k, v, expected_cache, 0.125, 0)
        calls.clear()
        got = torch.ops.kiln.paged_attention(q, k, v, cache, 0.125, 0)
    assert not calls
    assert torch.equal(got, expected)
    assert torch.equal(cache, expected_cache)


@pytest.mark.parametrize("num_prefill_tokens", [0, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_recorded_call_attends_into_its_recorded_result(kernel, num_prefill_tokens, dtype):
    """A replayed layer repeats the op's recorded call without the dispatcher: the kernel
    writes the tensor the call returned when recorded, every step, with the op's result.
    In a step the kernel does not attend (no metadata given to it), the call goes through
    the op, as recorded. Tensors the kernel would not take are replayed as the op."""
    op = torch.ops.kiln.paged_attention.default
    q, k, v, cache, meta = _batch([3, 8, 21], num_prefill_tokens, 9, 3, 64, seed=7)
    q, k, v, cache = (x.to(dtype) for x in (q, k, v, cache))
    recorded = torch.full_like(q, float("nan"))
    again = bind_recorded(op, (q, k, v, cache, 0.125, 0), {}, recorded)
    assert again is not None
    for decode_kernel in (kernel, None):
        meta.decode_kernel = decode_kernel
        expected_cache = cache.clone()
        with attention_context(meta):
            expected = paged_attention_step(q, k, v, expected_cache, 0.125, 0)
        recorded.fill_(float("nan"))
        with attention_context(meta):
            again()
        assert torch.equal(recorded, expected)
        assert torch.equal(cache, expected_cache)
    assert bind_recorded(op, (q, k, v, cache, 0.125, 0), {}, recorded[:, :3]) is None
    assert bind_recorded(torch.ops.kiln.paged_attention_torch.default,
                         (q, k, v, cache, 0.125, 0), {}, recorded) is None
    assert bind_recorded(op, (q.transpose(0, 1).contiguous().transpose(0, 1), k, v, cache,
                              0.125, 0), {}, recorded) is None
    assert bind_recorded(op, (q, k, v, cache.float() if dtype != torch.float32 else
                              cache.bfloat16(), 0.125, 0), {}, recorded) is None


def test_an_error_on_the_torch_path_keeps_its_message(kernel, monkeypatch):
    """Without the step's metadata (a runtime that has no kernel for its dtype), the CPU
    kernel calls the torch path back through the dispatcher, which passes an error on
    without its message: the step raises the torch path's own exception."""
    import kiln.models.attention as attention

    def fails(*args):
        raise ValueError("the torch path failed")

    q, k, v, cache, meta = _batch([3], 4, 4, 2, 16)
    monkeypatch.setattr(attention, "paged_attention_step", fails)
    with pytest.raises(ValueError, match="the torch path failed"):
        with attention_context(meta):
            torch.ops.kiln.paged_attention(q, k, v, cache, 0.25, 0)
    q, k, v, cache, meta = _batch([3], 4, 4, 2, 16)
    meta.decode_kernel = kernel
    with attention_context(meta):  # with the step's metadata it never calls it
        torch.ops.kiln.paged_attention(q, k, v, cache, 0.25, 0)


@pytest.mark.parametrize("num_prefill_tokens", [0, 5])
def test_padded_rows_on_the_torch_path(num_prefill_tokens):
    """Without the kernel (no compiler, or CUDA) padded rows are neither written nor
    attended either, and come back as zeros."""
    q, k, v, cache, meta = _batch([2, 5, 11], num_prefill_tokens, 6, 2, 16, seed=3)
    expected_cache = cache.clone()
    expected = paged_attention(q, k, v, expected_cache, meta, 0.25)
    q, k, v = (torch.cat([x, torch.randn(2, *x.shape[1:])]) for x in (q, k, v))
    got = paged_attention(q, k, v, cache, meta, 0.25)
    assert torch.equal(got[:-2], expected)
    assert torch.equal(got[-2:], torch.zeros_like(got[-2:]))
    assert torch.equal(cache, expected_cache)


def test_compiled_layers_call_the_op_where_its_kernel_attends(kernel):
    """Only there does a compiled layer keep the attention instead of splitting at it: a
    float16 model or a GPU would only call the torch path back through the dispatcher."""
    from kiln.models.cpu_attention import attends_in_compiled_code

    cpu = torch.device("cpu")
    assert attends_in_compiled_code(cpu, torch.float32)
    assert attends_in_compiled_code(cpu, torch.bfloat16)
    assert not attends_in_compiled_code(cpu, torch.float16)
    assert not attends_in_compiled_code(torch.device("cuda"), torch.float32)
