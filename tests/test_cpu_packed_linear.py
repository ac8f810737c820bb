"""kiln::linear_packed, oneDNN with packed weights for the several-row pieces of float32
models on CPU (and of bfloat16 ones on CPUs without bfloat16 instructions), against
F.linear."""

import gc

import pytest
import torch
import torch.nn.functional as F

from kiln.models.cpu_packed_linear import can_pack, pack_linear_weights
from kiln.models.layers import MergedColumnParallelLinear, RowParallelLinear

pytestmark = pytest.mark.skipif(not can_pack(torch.device("cpu"), torch.float32),
                                reason="torch built without oneDNN")


def _projections() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(MergedColumnParallelLinear(576, [1536, 1536]),
                                RowParallelLinear(1536, 576, bias=True))
    for param in model.parameters():
        param.data.normal_()
    return model


@pytest.mark.parametrize("rows", [2, 37, 64, 300])
def test_packed_weights_match_f_linear(rows):
    model = _projections()
    assert pack_linear_weights(model) == 2  # the bias is not a projection weight
    for module in model:
        x = torch.randn(rows, module.weight.shape[1])
        got = torch.ops.kiln.linear_packed(x, module.weight)
        torch.testing.assert_close(got, F.linear(x, module.weight), rtol=1e-4, atol=1e-3)


def test_weights_without_a_valid_packed_copy_run_f_linear():
    """Unpacked, replaced after packing, 16-bit, or inputs that are not one row per token:
    F.linear's own result, bit for bit."""
    model = _projections()
    pack_linear_weights(model)
    up, down = model
    x = torch.randn(5, 576)
    fresh = torch.randn(3072, 576)
    assert torch.equal(torch.ops.kiln.linear_packed(x, fresh), F.linear(x, fresh))
    up.weight.data = up.weight.data.clone()  # another buffer: the packed copy is stale
    assert torch.equal(torch.ops.kiln.linear_packed(x, up.weight), F.linear(x, up.weight))
    x3 = torch.randn(2, 3, 1536)
    assert torch.equal(torch.ops.kiln.linear_packed(x3, down.weight), F.linear(x3, down.weight))
    half = down.to(torch.float16)
    assert pack_linear_weights(half) == 0  # float32 and bfloat16 only
    xh = torch.randn(4, 1536, dtype=torch.float16)
    assert torch.equal(torch.ops.kiln.linear_packed(xh, half.weight), F.linear(xh, half.weight))


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_weights_are_packed_in_float32_where_the_cpu_lacks_bfloat16(monkeypatch,
                                                                             native):
    """Without bfloat16 instructions: a float32 packed copy, the rows widened and the result
    rounded to bfloat16, as a product summed in float32 is: nearly every value as F.linear
    in float32 rounded, the rest within rounding. With them: no copy, F.linear's own."""
    from kiln.models import cpu_packed_linear

    monkeypatch.setattr(cpu_packed_linear, "cpu_has_native_bf16", lambda: native)
    model = _projections().to(torch.bfloat16)
    assert pack_linear_weights(model) == (0 if native else 2)
    for module in model:
        x = torch.randn(37, module.weight.shape[1]).to(torch.bfloat16)
        got = torch.ops.kiln.linear_packed(x, module.weight)
        assert got.dtype == torch.bfloat16
        if native:
            assert torch.equal(got, F.linear(x, module.weight))
            continue
        assert cpu_packed_linear._packed_copy(module.weight).dtype == torch.float32
        expected = F.linear(x.float(), module.weight.float())
        # Rounding moves a value by half a bfloat16 step at most (2^-8 of it); the float32
        # sums, taken in another order, by a little more near zero.
        torch.testing.assert_close(got.float(), expected, rtol=2 ** -8, atol=1e-3)
        assert (got != expected.to(torch.bfloat16)).float().mean() < 0.02


def test_a_freed_weight_takes_its_packed_copy_along():
    from kiln.models import cpu_packed_linear

    model = _projections()
    pack_linear_weights(model)
    ptrs = {m.weight.data_ptr() for m in model}
    assert ptrs <= set(cpu_packed_linear._packed)
    del model
    gc.collect()  # the layers' weight loaders make reference cycles
    assert not ptrs & set(cpu_packed_linear._packed)
