"""kiln's torch.compile backend: split at attention, compile each piece per size, share
artifacts between identical pieces, keep them in a persistent cache.

kiln compiles the decoder layer, not the whole model (graphs/runner.py): Dynamo traces one
layer call with a symbolic token count, and every other layer of the same structure reuses
that trace, so tracing time does not grow with depth. The traced graph is split at the
attention call (`kiln::paged_attention`, or `kiln::encoder_attention` in encoders); the
attention runs as it is, every other piece is compiled by Inductor for the token counts it
is called with (on CPU with kiln's attention kernel, `kiln::paged_attention` is no split
point: Inductor's code calls the op's C++ kernel itself, and a decoder layer is one piece):
one static shape per size, or (`dynamic`) one artifact with a symbolic token count for each
run of sizes above 1 that the same passes apply to. Pieces are keyed by their structure and
input shapes, never by which layer they came from."""

import bisect
import contextlib
import copy
import functools
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx
from torch.fx.passes.split_module import split_module

from ..models.attention import SPLIT_OPS
from ..models.cpu_attention import bind_recorded
from ..models.cpu_linear import bind_recorded_row
from . import passes as passes_module
from .cache import CompileCache
from .config import CompilationConfig
from .inductor import (
    DirectArtifact,
    builds_in,
    compile_piece,
    direct_form,
    graph_input_sources,
    load_direct,
)
from .passes import (
    SINGLE_TOKEN_INDUCTOR_OPTIONS,
    linear_as_weight_times_input,
    linear_with_packed_weights,
    single_token_linear_as_reduction,
    single_token_linear_as_row_kernel,
)

# The passes' code is part of every key: editing a pass must not load what the old one built.
_PASSES_SOURCE = hashlib.sha256(Path(passes_module.__file__).read_bytes()).hexdigest()


# kiln's passes: name -> (whether it applies to a piece compiled for this many tokens, pass,
# Inductor settings for the pieces it applies to, given their device type; the user's
# inductor_options win).
PASSES = {
    "single_token_linear_as_row_kernel": (lambda size: size == 1,
                                          single_token_linear_as_row_kernel,
                                          lambda device_type: {}),
    "single_token_linear_as_reduction": (lambda size: size == 1,
                                         single_token_linear_as_reduction,
                                         lambda device_type: SINGLE_TOKEN_INDUCTOR_OPTIONS),
    "linear_as_weight_times_input": (lambda size: 1 < size <= 256,
                                     linear_as_weight_times_input, lambda device_type: {}),
    "linear_with_packed_weights": (lambda size: size > 1, linear_with_packed_weights,
                                   lambda device_type: {}),
    "few_rows_linear_with_packed_weights": (lambda size: 1 < size <= 256,
                                            linear_with_packed_weights,
                                            lambda device_type: {}),
}

logger = logging.getLogger("kiln")


def _bind_recorded(op, args: tuple, kwargs: dict, result):
    """A recorded call of one of kiln's CPU kernels' ops made again by the kernel itself,
    writing the recorded result in place; None for other calls."""
    return bind_recorded(op, args, kwargs, result) or \
        bind_recorded_row(op, args, kwargs, result)


def uses_packed_weights(passes: list[str]) -> bool:
    """Whether any of `passes` calls the projections' packed copies, which must then exist."""
    return any(PASSES[name][1] is linear_with_packed_weights for name in passes)


def _split_op(node: fx.Node, names: tuple[str, ...]):
    """The plain function behind the node's op if it is one of the split points `names`
    (keys of SPLIT_OPS), else None."""
    if node.op != "call_function":
        return None
    op = str(node.target).removesuffix(".default")
    return SPLIT_OPS[op] if op in names else None


def direct_key(key: str) -> str:
    """The cache key of an artifact's description for `load_direct` (named apart from the
    first format's `-direct`, whose libraries lived in Inductor's build directory)."""
    return f"{key}-code"


class UncompiledSizeError(RuntimeError):
    """A compiled model was called with a token count it was not compiled for."""


@dataclass
class CompileCounters:
    num_traces: int = 0  # Dynamo graphs handed to the backend
    num_traces_restored: int = 0  # graphs rebuilt from a record instead (compiler/record.py)
    num_compiles: int = 0  # Inductor compilations (cache misses)
    num_cache_loads: int = 0  # artifacts loaded from the persistent cache
    num_shared: int = 0  # pieces served by an artifact another piece already produced
    num_deferred: int = 0  # verified in the cache at warm-up, loaded when first used
    num_direct_loads: int = 0  # cache loads that ran the generated code without Inductor
    seconds_by_size: dict[int, float] = field(default_factory=dict)


def _structure(gm: fx.GraphModule) -> str:
    """The graph's operations with inputs numbered, so the same computation over different
    layers' weights gives the same text."""
    index = {}
    lines = []

    def ref(value):
        if isinstance(value, fx.Node):
            return f"%{index[value]}"
        if isinstance(value, (list, tuple)):
            return "(" + ",".join(ref(v) for v in value) + ")"
        if isinstance(value, dict):
            return "{" + ",".join(f"{k}:{ref(v)}" for k, v in sorted(value.items())) + "}"
        return repr(value)

    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        target = node.target if node.op in ("call_method", "placeholder", "output") else (
            getattr(node.target, "__qualname__", None) or str(node.target))
        name = "" if node.op == "placeholder" else str(target)
        lines.append(f"{node.op} {name} {ref(node.args)} {ref(node.kwargs)}")
    return "\n".join(lines)


def _signature(args, symbolic: list[bool] | None = None) -> str:
    """Dtypes, shapes, strides and devices of the arguments; the token count of those marked
    in `symbolic` is written as T."""
    parts = []
    for i, a in enumerate(args):
        token = symbolic is not None and symbolic[i]
        if isinstance(a, torch.Tensor):
            shape = ("T", *a.shape[1:]) if token else tuple(a.shape)
            parts.append(f"{a.dtype}{shape}{a.stride()}{a.device.type}")
        else:
            parts.append("T" if token else repr(a))
    return ";".join(parts)


@dataclass
class PieceInfo:
    """What kiln knows of a piece besides its graph (saved in records, compiler/record.py)."""

    structure: str  # hash of the piece's operations, the same for every layer
    token_arg: int | None  # None: the graph was traced for `static_size` only
    static_size: int | None
    token_sized: list[bool]  # which inputs have the token count as their size
    returns_one: bool  # a single output (loaded artifacts return a sequence even then)
    num_outputs: int  # the graph's outputs (1 where `returns_one`)
    only_sizes: list[int] | None = None  # None: every size of the backend
    keys: dict[int, str] = field(default_factory=dict)  # size -> artifact key

    @classmethod
    def of(cls, gm: fx.GraphModule, static_size: int | None) -> "PieceInfo":
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        output = next(n for n in gm.graph.nodes if n.op == "output")
        return cls(structure=hashlib.sha256(_structure(gm).encode()).hexdigest(),
                   token_arg=_token_arg(gm), static_size=static_size,
                   token_sized=[_is_token_sized(n) for n in placeholders],
                   returns_one=not isinstance(output.args[0], (tuple, list)),
                   num_outputs=len(output.args[0]) if isinstance(output.args[0], (tuple, list))
                   else 1)


class Piece(torch.nn.Module):
    """One compiled piece of the split graph: one artifact per token count. `gm` is None
    for a piece restored from a record, whose artifacts are all in the cache."""

    def __init__(self, gm: fx.GraphModule | None, info: PieceInfo, backend: "KilnBackend"):
        super().__init__()
        self.gm = gm
        self.info = info
        self.backend = backend
        self.compiled: dict[int, object] = {}
        self.example_args: list | None = None  # from the first call, to derive other sizes

    def forward(self, *args):
        info = self.info
        size = info.static_size if info.token_arg is None else args[info.token_arg].shape[0]
        if self.example_args is None:
            self.example_args = list(args)
        fn = self.compiled.get(size)
        if fn is None:
            fn = self.compiled[size] = self.backend.artifact_for(self, size, list(args))
        if self.backend.recorded is not None:  # see GraphRunner: one layer's call, recorded
            if isinstance(fn, DirectArtifact):
                out, replay = fn.record(list(args), _bind_recorded)
            else:
                out, replay = fn(*args), None
            self.backend.recorded.append(replay)
        else:
            out = fn(*args)
        if info.returns_one and isinstance(out, (tuple, list)):
            return out[0]
        return out

    def prepare(self, size: int) -> None:
        """Make sure an artifact for `size` exists, compiling it if the cache has none,
        without running the piece: inputs sized by the token count are replaced by empty
        tensors of that size, with the strides the real inputs have (they do not depend on
        the token count). A cached artifact is loaded on first use (0.2 s each here)."""
        info = self.info
        if info.token_arg is None or size in self.compiled or size in info.keys or \
                self.example_args is None or (info.only_sizes is not None and
                                              size not in info.only_sizes):
            return
        args = []
        for arg, token_sized in zip(self.example_args, info.token_sized):
            if token_sized and isinstance(arg, torch.Tensor):
                arg = torch.empty_strided((size, *arg.shape[1:]), arg.stride(), dtype=arg.dtype,
                                          device=arg.device)
            elif token_sized:
                arg = size  # the symbolic token count itself
            args.append(arg)
        artifact = self.backend.ensure(self, size, args)
        if artifact is not None:
            self.compiled[size] = artifact


def _is_token_sized(node: fx.Node) -> bool:
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and value.dim() > 0 and \
        isinstance(value.shape[0], torch.SymInt)


def _token_arg(gm: fx.GraphModule) -> int | None:
    """Index of an argument whose first dimension is the symbolic token count; None when
    the graph was traced with a static one (Dynamo specialises a count of 1)."""
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.Tensor) and value.dim() > 0 and \
                isinstance(value.shape[0], torch.SymInt):
            return i
    return None


class _Children:
    """Stands in for a split graph as the `self` of its forward: its children are the plain
    functions `_plain_forward` made of them, anything else is the graph's own."""

    def __init__(self, module: torch.nn.Module, children: dict):
        self.__dict__.update(children)
        self._module = module

    def __getattr__(self, name: str):
        return getattr(self._module, name)


def _plain_forward(module: torch.nn.Module):
    """The split graph's forward, calling its pieces and attention subgraphs without
    nn.Module.__call__ (kiln sets no hooks on them). In a batch-1 decode step every weight
    streams through the caches between two such calls, and the module machinery then costs
    about 1.2 ms of a 45 ms step here (interleaved A/B)."""
    if isinstance(module, Piece):
        return module.forward
    children = {name: _plain_forward(child) for name, child in module.named_children()}
    if isinstance(module, fx.GraphModule):  # its own forward may be a lazy recompiling stub
        code = module.graph.python_code(root_module="self")
        scope = dict(code.globals)
        exec(code.src, scope)
        forward = scope["forward"]
    else:
        forward = type(module).forward
    return functools.partial(forward, _Children(module, children))


class DirectCall:
    """One trace's split graph, callable without Dynamo: the inputs are read from the layer
    and its arguments by the expressions Dynamo recorded for them. Dynamo's per-call guard
    checks and frame handling cost about 0.5 ms per layer here; kiln calls a layer this way
    only after a call through Dynamo chose this trace for that very layer and the recorded
    expressions reproduced that call's inputs (see `GraphRunner`)."""

    def __init__(self, split: torch.nn.Module, sources: list[str]):
        self.split = split
        self.run = _plain_forward(split)
        self.sources = sources
        # Dynamo's own source expressions over the traced function's locals (`L`), such as
        # L['layer']._modules['mlp']._parameters['weight'] or L['args'][0].
        self.read_inputs = eval(f"lambda L: ({', '.join(sources)},)")

    def bind(self, layer: torch.nn.Module, run: Callable | None = None,
             order: list[int] | None = None) -> Callable[[tuple], tuple]:
        """The call for one layer, `call(args)`: what the trace reads from the layer (its
        weights, its KV cache, fixed once the runtime has bound the cache) is read now, once;
        only the call's arguments are read per call. Reading those attribute chains per layer
        and step cost 0.35-0.6 ms of a 36 ms batch-1 decode step of SmolLM2 here
        (interleaved A/B, four runs, both orders). `run`: what takes the graph's inputs
        instead of the split graph, or the inputs numbered `order`, in that order."""
        names, scope = [], {"run": run or self.run}
        for i, source in enumerate(self.sources):
            if source.startswith("L['args']"):
                names.append("args" + source[len("L['args']"):])
            else:
                names.append(f"c{i}")
                scope[f"c{i}"] = eval(f"lambda L: {source}")({"layer": layer})
        if order is not None:
            names = [names[i] for i in order]
        return eval(f"lambda args: run({', '.join(names)})", scope)

    def reproduces(self, layer, args: tuple, inputs: tuple) -> bool:
        ours = self.read_inputs({"layer": layer, "args": args})
        return len(ours) == len(inputs) and all(
            a is b if isinstance(a, torch.Tensor) else a == b for a, b in zip(ours, inputs))


class KilnBackend:
    def __init__(self, config: CompilationConfig, cache: CompileCache | None, sizes: list[int],
                 cache_salt: str, split_at: tuple[str, ...] = tuple(SPLIT_OPS),
                 inductor_ready: Callable[[], None] = lambda: None):
        self.config = config
        self.inductor_ready = inductor_ready  # called before Inductor compiles or loads
        self.split_at = split_at  # the ops graphs are split at; others compile in their piece
        self.cache = cache
        self.sizes = sorted(set(sizes))
        self.ranges = self._ranges(self.sizes) if config.dynamic else {}
        self.cache_salt = cache_salt  # model config, dtype, layout, versions
        self.counters = CompileCounters()
        self.artifacts: dict[str, object] = {}
        self.deferred: set[str] = set()  # keys verified in the cache, not loaded yet
        self.pieces: list[Piece] = []
        self.last_call: tuple | None = None  # (DirectCall or None, inputs, outputs)
        self.recorded: list | None = None  # while recording: each piece call's Replay or None

    def __call__(self, gm: fx.GraphModule, example_inputs: list):
        self.counters.num_traces += 1
        # A decoder's positions give the size of a static trace; encoder layers take no
        # int64 input, and their traces are always symbolic.
        static_size = next((a.shape[0] for a in example_inputs
                            if isinstance(a, torch.Tensor) and a.dtype == torch.int64), None)
        pieces: dict[fx.Node, int] = {}
        piece = 0
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "output"):
                continue
            if _split_op(node, self.split_at) is not None:
                pieces[node] = piece + 1
                piece += 2
            else:
                pieces[node] = piece
        split = split_module(gm, None, lambda n: pieces[n], keep_original_order=True)
        for name, sub in list(split.named_children()):
            calls = [n for n in sub.graph.nodes if _split_op(n, self.split_at) is not None]
            for node in calls:
                node.target = _split_op(node, self.split_at)
            if calls:
                sub.recompile()
            else:
                piece = Piece(sub, PieceInfo.of(sub, static_size), self)
                self.pieces.append(piece)
                setattr(split, name, piece)
        sources = graph_input_sources(gm)
        direct = DirectCall(split, sources) if sources is not None else None

        def run(*inputs):
            outputs = split(*inputs)
            self.last_call = (direct, inputs, outputs)
            return outputs

        return run

    def prepare(self, size: int) -> None:
        """Make every traced piece ready for `size` tokens without running the model."""
        for piece in self.pieces:
            piece.prepare(size)

    def _rewritten(self, gm: fx.GraphModule, size: int) -> fx.GraphModule:
        """The piece's graph after kiln's passes for this size (a copy if any applies)."""
        passes = self._passes(size)
        if not passes:
            return gm
        gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        for name in passes:
            PASSES[name][1](gm)
        return gm

    def _passes(self, size: int) -> list[str]:
        return [name for name, (applies, _, _) in PASSES.items()
                if name in self.config.passes and applies(size)]

    def _inductor_options(self, size: int, args: list) -> dict:
        """Inductor settings for a piece compiled for `size` tokens with arguments `args`."""
        device_type = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        options = {}
        for name in self._passes(size):
            options.update(PASSES[name][2](device_type))
        return {**options, **self.config.inductor_config()}

    def _ranges(self, sizes: list[int]) -> dict[int, tuple[int, int]]:
        """size -> the run of sizes above 1 with the same passes that it belongs to: one
        dynamic artifact serves each run. Size 1 stays static: a one-token step is batch-1
        decode, whose kernels lose a quarter of their speed with a symbolic size here."""
        runs: list[list[int]] = []
        for size in (s for s in sizes if s > 1):
            if runs and self._passes(runs[-1][0]) == self._passes(size):
                runs[-1].append(size)
            else:
                runs.append([size])
        return {size: (run[0], run[-1]) for run in runs for size in run}

    def _span(self, size: int) -> tuple[int, int] | None:
        """The dynamic range whose artifact runs `size` tokens as they are: that of the size
        it would pad to, if the same passes apply to both."""
        i = bisect.bisect_left(self.sizes, size)
        span = self.ranges.get(self.sizes[i]) if i < len(self.sizes) else None
        if span is not None and self._passes(size) == self._passes(self.sizes[i]):
            return span
        return None

    def runs_unpadded(self, num_tokens: int) -> bool:
        """Whether a step of `num_tokens` tokens runs as it is, a dynamic artifact covering
        it, instead of padded up to a compiled size."""
        return self._span(num_tokens) is not None

    def _dynamic_range(self, piece: Piece, size: int) -> tuple[int, int] | None:
        return self._span(size) if piece.info.token_arg is not None else None

    def _key(self, piece: Piece, size: int, args: list) -> str:
        """The artifact's cache key, remembered by the piece (records keep it)."""
        span = self._dynamic_range(piece, size)
        if size not in self.sizes and span is None:
            raise UncompiledSizeError(
                f"called with {size} tokens; compiled sizes are {self.sizes}")
        key = piece.info.keys.get(size)
        if key is None:
            shapes = _signature(args, piece.info.token_sized if span else None)
            key = piece.info.keys[size] = hashlib.sha256(
                f"{self.cache_salt}|{self._inductor_options(size, args)}|{self._passes(size)}|"
                f"{_PASSES_SOURCE}|{piece.info.structure}|{shapes}|{span}".encode()
            ).hexdigest()[:32]
        return key

    def ensure(self, piece: Piece, size: int, args: list):
        """The artifact if it had to be compiled or is in memory; None if a verified copy
        waits in the cache (loaded by `artifact_for` when first called)."""
        key = self._key(piece, size, args)
        if key not in self.artifacts and self.cache is not None and (
                key in self.deferred or self.cache.contains(key)):
            if key not in self.deferred:  # sizes of one dynamic range share their key
                self.deferred.add(key)
                self.counters.num_deferred += 1
            return None
        return self.artifact_for(piece, size, args)

    def _load_direct(self, key: str):
        """The artifact's generated code, run without Inductor (compiler/inductor.py's
        `load_direct`), if the cache describes it and still holds the artifact itself (which
        records and later starts rely on); None otherwise, or if a kernel library the
        description names is missing or changed (the description is then dropped)."""
        if self.cache is None or not self.cache.contains(key):
            return None
        form = self.cache.load_record(direct_key(key))
        if form is None:
            return None
        try:
            artifact = load_direct(form, self.cache.library)
        except Exception as e:  # from the cache's data: never trusted beyond a fallback
            logger.warning("cannot run compile cache entry %s directly (%s); loading it "
                           "through Inductor", key, e)
            self.cache.remove(direct_key(key))
            return None
        self.counters.num_direct_loads += 1
        return artifact

    def is_direct(self, key: str) -> bool:
        """Whether the cache holds a description of the artifact for `load_direct`."""
        return self.cache is not None and self.cache.contains(direct_key(key))

    def artifact_for(self, piece: Piece, size: int, args: list):
        key = self._key(piece, size, args)
        if key in self.artifacts:
            self.counters.num_shared += 1
            return self.artifacts[key]
        start = time.perf_counter()
        with builds_in(self.cache.root) if self.cache is not None else contextlib.nullcontext():
            artifact = self._load_direct(key)
            if artifact is None:
                self.inductor_ready()
                artifact = self.cache.load(key) if self.cache is not None else None
                if artifact is not None:
                    self.counters.num_cache_loads += 1
                elif piece.gm is None:
                    raise RuntimeError(f"compile cache entry {key} in {self.cache.root} went "
                                       f"missing while kiln ran; start again to rebuild it")
                else:
                    artifact = compile_piece(self._rewritten(piece.gm, size), args,
                                             self._inductor_options(size, args),
                                             dynamic=self._dynamic_range(piece, size) is not None)
                    self.counters.num_compiles += 1
                    if self.cache is not None:
                        self.cache.save(key, artifact)
                if self.cache is not None and (form := direct_form(
                        artifact, len(piece.info.token_sized), piece.info.num_outputs,
                        self.cache.keep_library)):
                    self.cache.save_record(direct_key(key), form)
                    # Run as later starts will: the same code, and calls that can be
                    # replayed (GraphRunner).
                    artifact = load_direct(form, self.cache.library)
        elapsed = time.perf_counter() - start
        self.counters.seconds_by_size[size] = self.counters.seconds_by_size.get(size, 0) + elapsed
        self.artifacts[key] = artifact
        return artifact
