"""Several rows of activations times a weight matrix on CPU, y = x W^T, through oneDNN with
the weight reordered once into oneDNN's blocked layout: the projections of prefill chunks
and batched decode steps in float32 (on AVX2 of up to 256 rows: compiler/config.py), and
the logits of several rows. In bfloat16 on a CPU without bfloat16 instructions, the same
with a float32 packed copy of the bfloat16 weight.

Inductor's code for those calls MKL through `aten.mm`, which reads the weight in its plain
row-major layout on every call. On the Zen 4 EPYC here, oneDNN with packed weights ran
SmolLM2's four projections 1.26-1.37x faster at 37-64 rows and 1.11-1.14x at 512-2048
(float32), and a 64-prompt generation (128 new tokens each) at 271-285 tokens/s against
215-234 in one process, alternating, with the same greedy tokens. In bfloat16 the same
generation gained 1-6 % and changed greedy tokens, so only float32 takes this path. On
the Zen 3 EPYC (AVX2), the packed product ran the logits of 64 rows in 28.6 ms against
36.7 for kiln's slices of W x^T (models/llama.py).

A CPU without bfloat16 instructions has no fast bfloat16 product: torch's ran at 14 GFLOP/s
on the Zen 3 EPYC (AVX2) against 88-106 for the float32 packed copy with the rows widened
to float32 and the result rounded to bfloat16 (64 and 2048 rows of SmolLM2's MLP
projection; 1 to 1.4 values in 10 000 a bfloat16 step apart from torch's, which also sums
in float32). So a bfloat16 model there multiplies several rows in float32, as it would
have to in any BLAS, and keeps its two bytes a weight for batch-1 decode, which only
streams them.

The packed copy is kept beside the weight, which batch-1 decode still streams in its plain
layout (models/cpu_linear.py): float32 models hold their projection weights and their
vocabulary matrix twice (bfloat16 ones three times over in bytes).

`kiln::linear_packed` is an ordinary torch op whose kernel finds the weight's packed copy;
a weight without one (another model, another device, a call outside kiln's compiled code)
runs F.linear. The packing and the packed product are torch's internal oneDNN ops (those
Inductor's own freezing path uses; no public API offers them): this module is the one
place kiln calls them."""

import functools
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .layers import ColumnParallelLinear

_LIB = torch.library.Library("kiln", "FRAGMENT")
_LIB.define("linear_packed(Tensor x, Tensor weight) -> Tensor")

# weight.data_ptr() -> (the weight, weakly; its packed copy). A weight whose storage was
# replaced keeps a stale entry, which lookups check for; a freed one takes its entry along.
_packed: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def _forget(ptr: int, ref: weakref.ref) -> None:
    entry = _packed.get(ptr)
    if entry is not None and entry[0] is ref:  # not a newer weight's at the same address
        del _packed[ptr]


# The row count oneDNN picks the packed layout for: a batched decode step's (any count runs).
_PACK_FOR_ROWS = 64


def _packed_copy(weight: torch.Tensor) -> torch.Tensor | None:
    entry = _packed.get(weight.data_ptr())
    if entry is None:
        return None
    packed_from = entry[0]()
    if packed_from is None or packed_from.data_ptr() != weight.data_ptr() or \
            packed_from.shape != weight.shape:
        return None
    return entry[1]


def linear_with_packed_copy(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x W^T through W's packed copy, in x's dtype; None where W has none or x is not
    [rows, in]."""
    packed = _packed_copy(weight) if x.dim() == 2 and x.dtype == weight.dtype else None
    if packed is None:
        return None
    # `.to` is a no-op where the copy has x's dtype (float32 weights)
    out = torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, None, "none", [], "")
    return out.to(x.dtype)


def _linear_packed(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = linear_with_packed_copy(x, weight)
    return F.linear(x, weight) if out is None else out


_LIB.impl("linear_packed", _linear_packed, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::linear_packed")
def _(x, weight):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weights of `dtype` on `device` get a packed copy: float32 ones, and bfloat16
    ones where the CPU has no bfloat16 instructions (in float32). A CPU that has them runs
    bfloat16 products at their own speed, and there packed copies changed greedy tokens."""
    wanted = dtype == torch.float32 or (dtype == torch.bfloat16 and not cpu_has_native_bf16())
    return device.type == "cpu" and wanted and torch.backends.mkldnn.is_available()


@torch.no_grad()
def pack_linear_weights(model: nn.Module) -> int:
    """Give every linear projection of `model` (CPU weights loaded in place, of a dtype
    `can_pack` takes) and its vocabulary matrix, where it has one, a packed copy (float32),
    kept until the weight is freed; returns how many were packed."""
    weights = [module.weight for module in model.modules()
               if isinstance(module, ColumnParallelLinear)]  # every projection's class
    if hasattr(model, "logits_weight"):
        weights.append(model.logits_weight)
    count = 0
    for weight in weights:
        if not can_pack(weight.device, weight.dtype):
            continue
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().float(),
                                                          _PACK_FOR_ROWS)
        ptr = weight.data_ptr()
        _packed[ptr] = (weakref.ref(weight, lambda ref, ptr=ptr: _forget(ptr, ref)), packed)
        count += 1
    return count
