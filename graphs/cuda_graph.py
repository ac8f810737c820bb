"""CUDA-graph capture and replay of decode steps.

A decode-only batch of B requests is padded to a captured size S: the S - B padding entries
are dummy one-token sequences that write to and read from a sink block no request owns. Every
tensor the graph reads lives in `StaticBuffers`; a replay copies the step's values in first."""

from dataclasses import dataclass

import torch

from ..models import AttentionMetadata, attention_context


class ReplayMismatchError(RuntimeError):
    """A batch does not fit the shapes a CUDA graph was captured with."""


@dataclass
class StaticBuffers:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor  # [max_size, max_blocks_per_seq]
    sink_block: int
    block_size: int

    @classmethod
    def allocate(cls, max_size: int, max_blocks_per_seq: int, sink_block: int, block_size: int,
                 device: torch.device) -> "StaticBuffers":
        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.int64, device=device)

        buffers = cls(zeros(max_size), zeros(max_size), zeros(max_size), zeros(max_size),
                      zeros(max_size, max_blocks_per_seq), sink_block, block_size)
        buffers.pad(0, max_size)
        return buffers

    def pad(self, start: int, stop: int) -> None:
        """Entries [start, stop) become dummy sequences of one token in the sink block."""
        self.input_ids[start:stop] = 0
        self.positions[start:stop] = 0
        self.slot_mapping[start:stop] = self.sink_block * self.block_size
        self.seq_lens[start:stop] = 1
        self.block_tables[start:stop] = self.sink_block

    def copy_from(self, input_ids, positions, meta: AttentionMetadata, size: int) -> None:
        n = input_ids.shape[0]
        width = meta.block_tables.shape[1]
        if width > self.block_tables.shape[1]:
            raise ReplayMismatchError(f"block table of {width} blocks, captured with "
                                      f"{self.block_tables.shape[1]}")
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.block_tables[:n, width:] = self.sink_block
        self.pad(n, size)

    def metadata(self, size: int) -> AttentionMetadata:
        ones = torch.ones(size, dtype=torch.int64, device=self.seq_lens.device)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:size], seq_lens=self.seq_lens[:size],
            query_lens=ones, block_tables=self.block_tables[:size],
            token_to_seq=torch.arange(size, device=ones.device), token_offsets=ones * 0,
            token_lens=self.seq_lens[:size],
            num_decodes=size, max_query_len=0)


class CudaGraphs:
    """One captured graph per decode size, sharing one memory pool."""

    def __init__(self, forward_fn, buffers: StaticBuffers):
        self.forward_fn = forward_fn
        self.buffers = buffers
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.metas: dict[int, AttentionMetadata] = {}
        self.pool = None
        self.num_captures = 0
        self.num_replays = 0

    def capture(self, sizes: list[int]) -> None:
        for size in sorted(sizes, reverse=True):  # largest first: smaller ones reuse its pool
            meta = self.metas[size] = self.buffers.metadata(size)
            ids, pos = self.buffers.input_ids[:size], self.buffers.positions[:size]
            with attention_context(meta):
                self.forward_fn(ids, pos)  # warm-up: lazy initialisation stays out of the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # A context of its own: what a pass computes once for all layers (the attention
            # masks) must be computed inside the graph, from the buffers each replay fills,
            # not taken from the warm-up as a constant of the padding it ran on.
            with attention_context(meta), torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = self.forward_fn(ids, pos)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[size] = graph
            self.num_captures += 1

    def can_replay(self, meta: AttentionMetadata, num_tokens: int, size: int) -> bool:
        return (size in self.graphs and meta.num_decodes == num_tokens
                and meta.block_tables.shape[1] <= self.buffers.block_tables.shape[1])

    def replay(self, input_ids, positions, meta: AttentionMetadata, size: int) -> torch.Tensor:
        self.buffers.copy_from(input_ids, positions, meta, size)
        self.graphs[size].replay()
        self.num_replays += 1
        return self.outputs[size][: input_ids.shape[0]]
