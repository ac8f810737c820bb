"""Building blocks shared by the decoder models.

Linear layers follow the tensor-parallel vocabulary (column / row / vocab parallel) so that
sharding can be added without touching model files; at one rank they are plain matmuls.
Every parameter carries a `weight_loader(param, tensor, shard_id)` that checks the shape and
copies the checkpoint tensor into place, so the loader never needs to know a model's layout.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _check_shape(loaded: torch.Tensor, expected: tuple, where: str = "") -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, the model "
                         f"expects {tuple(expected)}{where}")


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    _check_shape(loaded, param.shape)
    param.data.copy_(loaded)


def _new_param(*shape: int) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = default_weight_loader
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T (+ b), W split by output rows across ranks (one rank today)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.weight = _new_param(output_size, input_size)
        self.bias = _new_param(output_size) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input stored as one matrix
    (gate_up_proj); checkpoint shards are written into their row slice by index."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes) + 1)]
        for param in (self.weight, self.bias):
            if param is not None:
                param.weight_loader = self.weight_loader

    def shard_slice(self, shard_id) -> slice:
        return slice(self.output_offsets[shard_id], self.output_offsets[shard_id + 1])

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        target = param.data[self.shard_slice(shard_id)]
        _check_shape(loaded, target.shape, f" for shard {shard_id!r} of the fused weight")
        target.copy_(loaded)


class QKVParallelLinear(MergedColumnParallelLinear):
    """Fused q, k, v projections; shard ids are "q", "k", "v"."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False):
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias)

    def shard_slice(self, shard_id) -> slice:
        return super().shard_slice("qkv".index(shard_id))


class RowParallelLinear(ColumnParallelLinear):
    """y = x W^T (+ b), W split by input columns across ranks; at one rank the reduction
    across ranks is the identity."""


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = _new_param(vocab_size, hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to the vocabulary; its weight has the embedding's shape."""


class LogitsProjection(nn.Module):
    """Hidden states [T, H] times the vocabulary matrix -> float32 logits [T, V]. The matrix
    is an argument, not a parameter, so a tied embedding is not registered twice; as a
    module, the compiler can compile it like a layer."""

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, weight).float()


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _new_param(size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Normalise x; with `residual`, first add it and also return the sum (the next
        layer's residual), which lets a compiler fuse the add into the norm."""
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * x32.to(dtype)
        return out if residual is None else (out, residual)


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inverse_frequencies(head_dim: int, rope: dict) -> torch.Tensor:
    """Inverse frequencies for rotary embeddings, with linear or Llama-3 scaling."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    base = float(rope.get("rope_theta", 10000.0))
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if rope_type == "linear":
        inv_freq = inv_freq / float(rope["factor"])
    elif rope_type == "llama3":
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_len = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        is_medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(is_medium, smoothed, inv_freq)
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    """Rotate-half rotary embeddings (the Hugging Face Llama convention), with the cos/sin
    table precomputed for every position so a step only gathers rows by position."""

    def __init__(self, head_dim: int, max_position: int, rope: dict):
        super().__init__()
        inv_freq = rope_inverse_frequencies(head_dim, rope)
        angles = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.register_buffer("cos_sin", torch.cat([angles.cos(), angles.sin()], -1),
                             persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos, sin = self.cos_sin[positions].unsqueeze(-2).chunk(2, dim=-1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
