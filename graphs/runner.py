"""Runs the model for one step: eagerly, through the compiled callable of the step's padded
size, or by replaying that size's CUDA graph. One rule picks the path: eager when
`enforce_eager`; a graph when the batch is decode-only and its size was captured; otherwise
the compiled pieces at the padded size, or at the step's own token count where a dynamic
artifact covers it (no padding)."""

import collections
import hashlib
import logging
import time
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ..compiler.backend import KilnBackend, uses_packed_weights
from ..compiler.cache import CompileCache
from ..compiler.config import CompilationConfig
from ..compiler.inductor import (
    configure_dynamo,
    inductor_ready,
    keep_static,
    remember_vec_isa,
    start_kernel_header,
)
from ..compiler.record import TRACED_SOURCE, describe, restore
from ..models import AttentionMetadata, attention_context
from ..models.attention import SPLIT_OPS
from ..models.cpu_attention import attends_in_compiled_code
from ..models.cpu_packed_linear import pack_linear_weights
from .buckets import decode_sizes, padded_size
from .chain import LayerChain
from .cuda_graph import CudaGraphs, StaticBuffers

logger = logging.getLogger("kiln")


def _settings(compilation: CompilationConfig, sizes: list[int], cache_salt: str) -> str:
    """Everything besides the traced graphs that decides what a start traces and compiles."""
    return (f"{cache_salt}|{compilation.inductor_config()}|{compilation.passes}|"
            f"{compilation.dynamic}|{sorted(sizes)}|{TRACED_SOURCE}")


def start_key(compilation: CompilationConfig, sizes: list[int], cache_salt: str) -> str:
    """The name of the compile cache's mark that a start with these settings last ran every
    piece without Inductor: the next one then need not import Inductor beside the model load
    (a wrong guess costs time, never correctness)."""
    return "direct-start-" + hashlib.sha256(
        _settings(compilation, sizes, cache_salt).encode()).hexdigest()[:32]


def _call_layer(layer, *args):
    """The compile boundary: one decoder (or encoder) layer. Layers of the same structure
    share its trace (their weights are graph inputs), so tracing cost does not grow with
    depth."""
    return layer(*args)


class GraphRunner:
    def __init__(self, model: torch.nn.Module, device: torch.device, enforce_eager: bool,
                 compilation: CompilationConfig, sizes: list[int], max_num_seqs: int,
                 max_blocks_per_seq: int, sink_block: int, block_size: int,
                 cache: CompileCache | None, cache_salt: str):
        self.model = model
        self.device = device
        self.sizes = sizes
        self.backend = None
        self.cuda_graphs = None
        self.steps: collections.Counter = collections.Counter()  # (path, size) -> steps
        if enforce_eager:
            return
        self.cache = cache
        if uses_packed_weights(compilation.passes):
            pack_linear_weights(model)  # the pieces of several rows use the packed copies
        self.start_key = start_key(compilation, sizes, cache_salt)
        # Where the op's CPU kernel is registered, Inductor's code calls it directly: a
        # one-token step then never enters Python inside a layer (see models/cpu_attention.py).
        dtype = next(model.parameters()).dtype
        split_at = tuple(op for op in SPLIT_OPS if not (
            op == "kiln.paged_attention" and attends_in_compiled_code(device, dtype)))
        self.layers = model.attention_layers() if hasattr(model, "attention_layers") else []
        if self.layers and "kiln.paged_attention" not in split_at:
            # The compiled layer then takes its KV cache whole: its shape is in every artifact.
            cache_salt += f"|kv cache {tuple(self.layers[0].kv_cache.shape)}"
        self.backend = KilnBackend(compilation, cache, sizes, cache_salt, split_at,
                                   inductor_ready=self._inductor_ready)
        self.record_key = hashlib.sha256(
            f"record|{_settings(compilation, sizes, cache_salt)}|{split_at}".encode()
        ).hexdigest()[:32]
        self.traced_layer = None  # made by `_inductor_ready`
        self.direct: dict[torch.nn.Module, object] = {}  # layer -> its DirectCall
        self.bound: dict[torch.nn.Module, Callable] = {}  # layer -> its DirectCall, bound
        # layer -> its one-token call replayed (compiler/inductor.py's Replay), bound; None
        # where its call cannot be replayed
        self.replays: dict[torch.nn.Module, Callable | None] = {}
        # layer -> its Replay, and whether a call with given args runs it on them as they are
        self.recorded: dict[torch.nn.Module, tuple] = {}
        self.chain: LayerChain | None = None
        self.linking = True  # until a one-token step's calls were linked, or could not be
        self.calls: list | None = None  # a one-token step's (layer, args, outputs), to link
        self.one_token = False  # whether `run` is running a one-token step
        self.input_ids = torch.zeros(sizes[-1], dtype=torch.int64, device=device)
        self.positions = torch.zeros(sizes[-1], dtype=torch.int64, device=device)
        self.token_type_ids = torch.zeros(sizes[-1], dtype=torch.int64, device=device)
        self.decode_sizes = decode_sizes(sizes, max_num_seqs)
        if device.type == "cuda" and compilation.cudagraphs:
            buffers = StaticBuffers.allocate(self.decode_sizes[-1], max_blocks_per_seq,
                                             sink_block, block_size, device)
            self.cuda_graphs = CudaGraphs(self._compiled_forward, buffers)

    def _inductor_ready(self) -> None:
        """Inductor's and Dynamo's imports and kiln's settings for them, once: needed to
        trace a layer and to compile or load an artifact through Inductor, not to run the
        artifacts loaded directly (a warm start on CPU, compiler/inductor.py)."""
        if self.traced_layer is not None:
            return
        inductor_ready(self.cache.root if self.cache is not None else None, self.device)
        configure_dynamo(64)
        for layer in self.layers:
            keep_static(layer.kv_cache)
        # dynamic=True: one trace with symbolic sizes serves every token count; the pieces
        # are compiled per size or per range of sizes (see KilnBackend).
        self.traced_layer = torch.compile(_call_layer, backend=self.backend, fullgraph=True,
                                          dynamic=True)

    def compiled_layer(self, layer: torch.nn.Module, *args):
        """Run a layer's compiled pieces: through Dynamo the first time, then directly with
        the trace Dynamo chose for it, when its graph's output is the layer's output and its
        inputs can be read back from the layer and its arguments."""
        call = self.bound.get(layer)
        if call is None and layer in self.direct:
            call = self.bound[layer] = self.direct[layer].bind(layer)
        if call is not None:
            if not self.one_token:
                out = call(args)
            elif layer not in self.replays:
                out = self._record(layer, args)
            elif self.chain is not None and layer is self.chain.layers[0]:
                out = self.chain.start(args)
            else:
                ahead = self.chain.ran_ahead(layer, args) if self.chain is not None else None
                out = ahead if ahead is not None else (self.replays[layer] or call)(args)
            if self.calls is not None:
                self.calls.append((layer, args, out))
            return out[0] if len(out) == 1 else tuple(out)
        self.calls = None  # a layer runs through Dynamo this step: link a later one
        self._inductor_ready()
        out = self.traced_layer(layer, *args)
        entry, inputs, outputs = self.backend.last_call
        returned = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        if entry is not None and len(returned) == len(outputs) and all(
                a is b for a, b in zip(returned, outputs)) and \
                entry.reproduces(layer, args, inputs):
            self.direct[layer] = entry
        return out

    def _record(self, layer: torch.nn.Module, args: tuple) -> tuple:
        """Run a layer's one-token call, recording it. Where the layer's split graph is one
        piece that takes some of the graph's inputs and returns the graph's outputs as they
        are, and that piece's call can be replayed, later one-token steps replay it: the
        batch-1 decode steps: 23.96 against 25.34 ms per SmolLM2 step here (six alternating
        rounds in one process, same tokens)."""
        inputs = self.direct[layer].bind(layer, lambda *inputs: inputs)(args)
        self.backend.recorded = recorded = []
        try:
            out = self.bound[layer](args)
        finally:
            self.backend.recorded = None
        returned = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        self.replays[layer] = None
        replay = recorded[0] if len(recorded) == 1 else None
        if replay is not None and len(replay.outputs) == len(returned) and all(
                a is b for a, b in zip(replay.outputs, returned)):
            order = [next((i for i, b in enumerate(inputs) if b is a), None)
                     for a in replay.inputs]
            if None not in order:
                self.replays[layer] = self.direct[layer].bind(layer, replay, order)
                as_is = self.direct[layer].bind(
                    layer, lambda *given: replay.copies(given) == [], order)
                self.recorded[layer] = (replay, as_is)
        return returned

    def _compiled_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, **extra):
        return self.model(input_ids, positions, call_layer=self.compiled_layer, **extra)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states [T, H] for the step's T tokens (`token_type_ids`: encoders only)."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        if self.backend is None:
            with attention_context(meta):
                return self.model(input_ids, positions, **extra)
        num_tokens = input_ids.shape[0]
        size = num_tokens if self.backend.runs_unpadded(num_tokens) else padded_size(
            self.sizes, num_tokens)
        if self.cuda_graphs is not None and self.cuda_graphs.can_replay(meta, num_tokens, size):
            self.steps["graph_replay", size] += 1
            return self.cuda_graphs.replay(input_ids, positions, meta, size)
        self.steps["compiled", size] += 1
        inputs = [(self.input_ids, input_ids), (self.positions, positions)]
        if token_type_ids is not None:
            inputs.append((self.token_type_ids, token_type_ids))
            extra["token_type_ids"] = self.token_type_ids[:size]
        for buffer, values in inputs:
            buffer[:num_tokens].copy_(values)
            if size > num_tokens:
                buffer[num_tokens:size] = 0
        # One-token steps on CPU replay their layers' recorded calls, which write the same
        # tensors every step: what the model returns is copied out of them.
        one_token = self.one_token = size == 1 and self.device.type == "cpu"
        if one_token and self.linking:
            self.calls = []
        try:
            with attention_context(meta):
                hidden = self._compiled_forward(self.input_ids[:size], self.positions[:size],
                                                **extra)
            if self.calls:  # every layer replayed or was recorded: chain them, or never
                self.chain = LayerChain.link(self.calls, self.recorded, self.replays)
                self.linking = False
        finally:
            self.one_token = False
            self.calls = None
            if self.chain is not None:
                self.chain.next = 0
        return hidden[:num_tokens].clone() if one_token else hidden[:num_tokens]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the rows that sample. One row (batch-1 decode) runs the compiled
        projection, where kiln's single-token pass turns the 113 MB matrix-vector product of
        SmolLM2 into a fused reduction (7 ms instead of MKL's 12 here); more rows run BLAS
        eagerly, as Inductor would call it."""
        if self.backend is None or hidden.shape[0] != 1 or 1 not in self.sizes:
            return self.model.compute_logits(hidden)
        return self.model.compute_logits(hidden, call_layer=self.compiled_layer)

    def _trace_logits(self) -> None:
        """Trace (unless restored) and compile the logits projection for one row only."""
        num_pieces = len(self.backend.pieces)
        dtype = next(self.model.parameters()).dtype
        with torch.inference_mode():
            self.logits(torch.zeros(1, self.model.config.hidden_size, dtype=dtype,
                                    device=self.device))
        for piece in self.backend.pieces[num_pieces:]:
            piece.info.only_sizes = [1]

    def _restore(self) -> bool:
        """Take the traced graphs from the cache's record of them, if it has one and every
        artifact it names."""
        record = self.cache.load_record(self.record_key) if self.cache is not None else None
        direct = restore(record, self.model, self.backend) if record is not None else None
        if direct is None:
            return False
        self.direct.update(direct)
        return True

    def warmup(self, dummy_metadata: Callable[[int], AttentionMetadata]) -> None:
        """Trace with one forward pass of the smallest size (or rebuild the traces from the
        cache's record and run that pass), make every other size ready without running it,
        record the traces, then capture the decode sizes on CUDA."""
        if self.backend is None:
            return
        restored = self._restore()
        if not restored:  # the trace below may compile
            start_kernel_header(self.device)
        traced = self.sizes[:1]
        bar = tqdm(self.sizes, desc="Compiling sizes", unit="size", dynamic_ncols=True)
        for size in bar:
            start = time.perf_counter()
            if size in traced:
                ids = torch.zeros(size, dtype=torch.int64, device=self.device)
                with torch.inference_mode():  # as in serving: Dynamo guards on the mode
                    self.run(ids, ids, dummy_metadata(size))
                if hasattr(self.model, "compute_logits") and 1 in self.sizes:
                    self._trace_logits()
            else:
                self.backend.prepare(size)
            bar.set_postfix_str(f"{size} tokens: {time.perf_counter() - start:.1f} s")
        self.steps.clear()  # count serving steps only
        keys = {key for piece in self.backend.pieces for key in piece.info.keys.values()}
        if restored:  # every artifact was verified; those not yet loaded wait for first use
            self.backend.counters.num_deferred += len(keys - self.backend.artifacts.keys())
        elif self.cache is not None and (record := describe(self.direct, self.model)):
            self.cache.save_record(self.record_key, record)
        if self.cache is not None:
            self.cache.set_mark(self.start_key, all(map(self.backend.is_direct, keys)))
        if self.device.type == "cpu" and self.cache is not None and self.traced_layer is not None:
            remember_vec_isa(self.cache.root)
        if self.cuda_graphs is not None:
            with torch.inference_mode():
                self.cuda_graphs.capture(self.decode_sizes)
        logger.info("compiled %d sizes: %s", len(self.sizes), self.backend.counters)
