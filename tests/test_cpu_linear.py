"""kiln::linear_row, the one-row projection kernel of compiled batch-1 decode on CPU,
against F.linear."""

import pytest
import torch
import torch.nn.functional as F

from kiln.models.cpu_linear import load_linear_kernel


@pytest.fixture(scope="module", autouse=True)
def kernel(tmp_path_factory):
    assert load_linear_kernel(tmp_path_factory.mktemp("kernels")), \
        "g++ (which Inductor needs on CPU too) should build the kernel"
    # Loading registered the C++ kernel: the op no longer falls through to F.linear.
    assert torch._C._dispatch_has_kernel_for_dispatch_key("kiln::linear_row", "CPU")


def _steps_apart(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How many bfloat16 steps each value of `got` lies from `expected`."""
    return (got.view(torch.int16).int() - expected.view(torch.int16).int()).abs()


# rows: fewer than one group of 4, a partial last group, many groups (prefetching ahead);
# columns: a multiple of the vector width and not
@pytest.mark.parametrize("rows,cols", [(3, 64), (13, 576), (1536, 576), (576, 1536), (37, 70)])
def test_float32_matches_f_linear(rows, cols):
    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(1, cols, generator=gen), torch.randn(rows, cols, generator=gen)
    got = torch.ops.kiln.linear_row(x, w)
    assert got.shape == (1, rows)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows,cols", [(13, 576), (3072, 576), (576, 1536), (37, 70)])
def test_bfloat16_matches_f_linear_in_float32_rounded(rows, cols):
    """Sums in float32, rounded once: nearly every value as F.linear on the same values in
    float32 rounded to bfloat16, none more than one bfloat16 step away."""
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(1, cols, generator=gen).to(torch.bfloat16)
    w = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
    got = torch.ops.kiln.linear_row(x, w)
    assert got.dtype == torch.bfloat16
    steps = _steps_apart(got, F.linear(x.float(), w.float()).to(torch.bfloat16))
    assert steps.max() <= 1 and (steps > 0).float().mean() < 0.02


def test_leading_dims_and_a_strided_row():
    """x may come as [1, 1, K] or as a strided slice of a wider row (a fused projection's
    output): one row either way."""
    w = torch.randn(24, 32)
    wide = torch.randn(1, 64)
    row = wide[:, ::2]
    torch.testing.assert_close(torch.ops.kiln.linear_row(row, w), F.linear(row, w))
    x = torch.randn(1, 1, 32)
    got = torch.ops.kiln.linear_row(x, w)
    assert got.shape == (1, 1, 24)
    torch.testing.assert_close(got, F.linear(x, w))


def test_what_the_kernel_does_not_take_runs_f_linear():
    """More than one row, a transposed weight, float16: F.linear's answer, exactly."""
    w = torch.randn(16, 8)
    x = torch.randn(3, 8)
    assert torch.equal(torch.ops.kiln.linear_row(x, w), F.linear(x, w))
    wt = torch.randn(8, 16).t()
    x = torch.randn(1, 8)
    assert torch.equal(torch.ops.kiln.linear_row(x, wt), F.linear(x, wt))
    h, wh = x.half(), w.half()
    assert torch.equal(torch.ops.kiln.linear_row(h, wh), F.linear(h, wh))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_recorded_call_is_made_again_on_the_recorded_tensors(dtype):
    """`bind_recorded_row`: the kernel writes the recorded result in place, from what the
    recorded input holds when it runs; calls it could not take as they are stay with the
    dispatcher."""
    from kiln.models.cpu_linear import bind_recorded_row

    op = torch.ops.kiln.linear_row.default
    x, w = torch.randn(1, 576).to(dtype), torch.randn(1536, 576).to(dtype)
    result = op(x, w)
    again = bind_recorded_row(op, (x, w), {}, result)
    x.copy_(torch.randn(1, 576))  # a later step's input, written in place
    result.zero_()
    again()
    assert torch.equal(result, op(x, w))
    assert bind_recorded_row(op, (torch.randn(576, 2)[:, :1].t(), w), {}, result) is None
    assert bind_recorded_row(op, (x, w.t()), {}, result) is None
    assert bind_recorded_row(torch.ops.aten.mm.default, (x, w), {}, result) is None
