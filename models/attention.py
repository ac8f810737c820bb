"""Paged attention: the metadata the runtime fills each step, and a torch implementation
that writes new K/V through `slot_mapping` and reads the context through block tables.

The attention call is the custom op `kiln::paged_attention`, opaque to torch.compile: the
compiler splits the model's graph there (on CPU, where the op has a C++ kernel, compiled code
calls it instead; models/cpu_attention.py), and the traced graph depends only on the number
of tokens. The op reads the step's metadata from `attention_context`, entered once per step
by the runtime, so the metadata's shapes and host integers never become part of a graph.

A batch is flat: `T` tokens from `B` sequences, decodes (one token each) first, then
prefill chunks. On the torch path decodes attend as one group with a query length of one;
prefill chunks are scattered into a padded [num_prefills, max_query_len] layout and attend
as a second group, so one long prompt never pads every decode to its length. The CPU kernel
attends every token as a row of its own.
"""

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_build import KERNEL_DTYPES

if TYPE_CHECKING:
    from .cpu_attention import DecodeKernel


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each new token
    seq_lens: torch.Tensor  # [B] context length of each sequence after this step
    query_lens: torch.Tensor  # [B] tokens each sequence computes this step
    block_tables: torch.Tensor  # [B, M] physical block ids, M covers the longest sequence
    token_to_seq: torch.Tensor  # [T] which sequence each token belongs to
    token_offsets: torch.Tensor  # [T] index of each token within its sequence's chunk
    token_lens: torch.Tensor  # [T] positions each token attends: its own position + 1
    num_decodes: int  # sequences (and tokens) at the front that decode one token
    max_query_len: int  # longest prefill chunk (0 when the batch is decode only)
    # CPU float32/bfloat16: every token attends through this kernel (models/cpu_attention.py)
    # instead of gathering its sequence's blocks for SDPA; None: the torch path
    decode_kernel: "DecodeKernel | None" = None


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]."""
    num_slots = kv_cache.shape[1] * kv_cache.shape[2]
    kv_cache[0].view(num_slots, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(num_slots, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def _gather(kv_cache: torch.Tensor, block_tables: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keys and values [S, L, Hkv, D] of S sequences' blocks, in order. index_select, not
    kv_cache[0][block_tables]: the same gather, 3.5x faster on CPU."""
    rows = block_tables.flatten()
    shape = (block_tables.shape[0], -1, *kv_cache.shape[3:])
    return kv_cache[0].index_select(0, rows).view(shape), \
        kv_cache[1].index_select(0, rows).view(shape)


def _attend_group(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                  mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [S, Q, Hq, D] padded queries of S sequences -> [S, Q, Hq, D]."""
    keys, values = _gather(kv_cache, block_tables)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=mask, scale=scale, enable_gqa=True,
    )
    return out.transpose(1, 2)


def _attend_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [S, Hq, D], one query per sequence -> [S, Hq, D]. The query heads that share a
    key/value head (head h uses kv head h // group) attend as that head's queries, so no
    key or value is repeated per query head (15 % faster than enable_gqa here)."""
    keys, values = _gather(kv_cache, block_tables)
    num_seqs, num_kv_heads = keys.shape[0], keys.shape[2]
    grouped = q.view(num_seqs, num_kv_heads, -1, q.shape[-1])
    out = F.scaled_dot_product_attention(grouped, keys.transpose(1, 2),
                                         values.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.reshape(q.shape)


def _group_mask(seq_lens: torch.Tensor, query_lens: torch.Tensor, num_queries: int,
                num_keys: int, sliding_window: int | None) -> torch.Tensor:
    """[S, 1, Q, L] which of a group's L gathered keys each of its Q padded queries sees."""
    key_pos = torch.arange(num_keys, device=seq_lens.device)
    query_pos = (seq_lens - query_lens)[:, None] + torch.arange(num_queries,
                                                                 device=seq_lens.device)
    # Padded query rows get positions past the sequence end: they still see every real key,
    # so no row of the softmax is empty.
    mask = (key_pos <= query_pos[..., None]) & (key_pos < seq_lens[:, None, None])
    if sliding_window is not None:
        mask &= key_pos > query_pos[..., None] - sliding_window
    return mask.unsqueeze(1)


_current: list[tuple[AttentionMetadata, dict]] = []


@contextlib.contextmanager
def attention_context(meta: AttentionMetadata):
    """Make `meta` the metadata every attention layer reads during one forward pass."""
    if _current:
        raise RuntimeError("attention_context does not nest: one forward pass at a time")
    _current.append((meta, {}))
    _torch_path_errors.clear()
    kernel = meta.decode_kernel
    if kernel is not None:
        kernel.begin_step(meta)
    try:
        yield meta
    except RuntimeError as e:
        if _torch_path_errors:
            raise _torch_path_errors[-1] from e
        raise
    finally:
        if kernel is not None:
            kernel.end_step()
        _torch_path_errors.clear()
        _current.pop()


def current_metadata() -> AttentionMetadata:
    if not _current:
        raise RuntimeError("attention ran outside attention_context: the runtime must enter "
                           "it around each forward pass")
    return _current[0][0]


def _shared(key, compute):
    """What every layer of one forward pass would compute alike (masks, prefill placement),
    computed by the first layer that asks. Outside a pass (direct calls), not kept."""
    if not _current:
        return compute()
    cache = _current[0][1]
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def paged_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         kv_cache: torch.Tensor, scale: float, sliding_window: int
                         ) -> torch.Tensor:
    """`paged_attention` with the metadata of the step running; `sliding_window` 0 means
    none."""
    return paged_attention(q, k, v, kv_cache, current_metadata(), scale, sliding_window or None)


_torch_path_errors: list[Exception] = []


def _torch_path_called_back(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            kv_cache: torch.Tensor, scale: float, sliding_window: int
                            ) -> torch.Tensor:
    """The torch path as the CPU kernel calls it back. The dispatcher gives that kernel an
    error code without the message, so an exception is also kept for attention_context to
    raise in place of the kernel's."""
    try:
        return paged_attention_step(q, k, v, kv_cache, scale, sliding_window)
    except Exception as e:
        _torch_path_errors.append(e)
        raise


# `kiln::paged_attention` runs the torch path unless a device kernel is registered: on CPU,
# models/cpu_attention.py registers one from C++ that attends the steps whose metadata the
# runtime gave it and calls `kiln::paged_attention_torch` for any other call.
_LIB = torch.library.Library("kiln", "FRAGMENT")
_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor(a!) kv_cache, float scale, int sliding_window)"
           " -> Tensor")
_LIB.define("paged_attention" + _SCHEMA)
_LIB.impl("paged_attention", paged_attention_step, "CompositeExplicitAutograd")
_LIB.define("paged_attention_torch" + _SCHEMA)
_LIB.impl("paged_attention_torch", _torch_path_called_back, "CompositeExplicitAutograd")


@torch.library.register_fake("kiln::paged_attention")
def _(q, k, v, kv_cache, scale, sliding_window):
    return torch.empty_like(q)


def encoder_attention_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Bidirectional attention of encoders: every token sees every token of its own sequence.
    q/k/v: [T', H, D] of a flat batch (no KV cache; `token_to_seq` and `token_offsets` place
    the step's real tokens, `seq_lens` bounds each sequence) -> [T', H, D], padded rows zero."""
    meta = current_metadata()
    num_tokens = meta.token_to_seq.shape[0]
    rows, cols = meta.token_to_seq, meta.token_offsets
    num_seqs, width = meta.seq_lens.shape[0], meta.max_query_len

    def padded(x: torch.Tensor) -> torch.Tensor:  # [S, H, L, D]
        out = x.new_zeros(num_seqs, width, *x.shape[1:])
        out[rows, cols] = x[:num_tokens]
        return out.transpose(1, 2)

    mask = _shared("encoder mask", lambda: (torch.arange(width, device=q.device)
                                            < meta.seq_lens[:, None])[:, None, None, :])
    out = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask,
                                         scale=scale)
    out = out.transpose(1, 2)[rows, cols]
    if num_tokens == q.shape[0]:
        return out
    return torch.cat([out, out.new_zeros(q.shape[0] - num_tokens, *out.shape[1:])])


encoder_attention_op = torch.library.custom_op(
    "kiln::encoder_attention", encoder_attention_step, mutates_args=())


@encoder_attention_op.register_fake
def _(q, k, v, scale):
    return torch.empty_like(q)


# The split points of compiled graphs and the plain functions behind them: a compiled layer
# calls these directly, skipping the dispatcher's custom-op machinery (0.2 ms a call here).
SPLIT_OPS = {"kiln.paged_attention": paged_attention_step,
             "kiln.encoder_attention": encoder_attention_step}


def _kernel_applies(meta: AttentionMetadata, kv_cache: torch.Tensor) -> bool:
    return meta.decode_kernel is not None and kv_cache.dtype in KERNEL_DTYPES and \
        kv_cache.device.type == "cpu" and kv_cache.is_contiguous()


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float,
                    sliding_window: int | None = None) -> torch.Tensor:
    """q: [T', Hq, D], k/v: [T', Hkv, D] -> [T', Hq, D]. T' may exceed the step's T new
    tokens (padding up to a compiled size): padded rows are neither written nor attended,
    and come back as zeros."""
    num_tokens, nd = meta.slot_mapping.shape[0], meta.num_decodes
    if _kernel_applies(meta, kv_cache):
        # One kernel call writes every new key and value, attends every token (a prefill
        # chunk's as rows of their own) and zeroes the padded rows.
        return meta.decode_kernel(q, k, v, kv_cache, meta.slot_mapping, meta.block_tables,
                                  meta.token_to_seq, meta.token_lens, scale,
                                  sliding_window or 0)
    num_padded = q.shape[0] - num_tokens
    q, k, v = q[:num_tokens], k[:num_tokens], v[:num_tokens]
    outputs = []
    write_kv(kv_cache, k, v, meta.slot_mapping)
    if nd > 0:
        tables = meta.block_tables[:nd]
        mask = _shared(("decode", sliding_window), lambda: _group_mask(
            meta.seq_lens[:nd], meta.query_lens[:nd], 1,
            tables.shape[1] * kv_cache.shape[2], sliding_window))
        outputs.append(_attend_decode(q[:nd], kv_cache, tables, mask, scale))
    if q.shape[0] > nd:
        tables = meta.block_tables[nd:]
        rows, cols = _shared("prefill rows", lambda: (meta.token_to_seq[nd:] - nd,
                                                      meta.token_offsets[nd:]))
        mask = _shared(("prefill", sliding_window), lambda: _group_mask(
            meta.seq_lens[nd:], meta.query_lens[nd:], meta.max_query_len,
            tables.shape[1] * kv_cache.shape[2], sliding_window))
        padded = q.new_zeros(tables.shape[0], meta.max_query_len, *q.shape[1:])
        padded[rows, cols] = q[nd:]
        out = _attend_group(padded, kv_cache, tables, mask, scale)
        outputs.append(out[rows, cols])
    if num_padded:
        outputs.append(q.new_zeros(num_padded, *q.shape[1:]))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


class Attention(nn.Module):
    """Multi-head attention over the paged KV cache. The runtime binds `kv_cache` (one
    [2, num_blocks, block_size, Hkv, D] tensor per layer) before the first step."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.kv_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.ops.kiln.paged_attention(q, k, v, self.kv_cache, self.scale,
                                             self.sliding_window or 0)
        return out.flatten(1)
