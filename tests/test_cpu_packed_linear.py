"""kiln::linear_packed, oneDNN with packed weights for the several-row pieces of float32
models on CPU, against F.linear."""

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
    half = down.to(torch.bfloat16)
    assert pack_linear_weights(half) == 0  # float32 only
    xb = torch.randn(4, 1536, dtype=torch.bfloat16)
    assert torch.equal(torch.ops.kiln.linear_packed(xb, half.weight), F.linear(xb, half.weight))


def test_a_freed_weight_takes_its_packed_copy_along():
    from kiln.models import cpu_packed_linear

    model = _projections()
    pack_linear_weights(model)
    ptrs = {m.weight.data_ptr() for m in model}
    assert ptrs <= set(cpu_packed_linear._packed)
    del model
    gc.collect()  # the layers' weight loaders make reference cycles
    assert not ptrs & set(cpu_packed_linear._packed)
