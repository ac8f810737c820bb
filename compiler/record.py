"""What Dynamo traced, saved beside the artifacts so a warm start needs no trace.

Tracing one decoder layer costs Dynamo 1.2-1.5 s here, a sixth of a warm start. A trace is
fully determined by kiln's model and compiler code, the model config and the compile
settings, so kiln keys a record of it by exactly those: each split graph's Python code, the
expressions that read its inputs from a layer, the cache keys of its compiled pieces for
every size, and which module used which graph. A warm start with a matching record whose
artifacts are all in the cache rebuilds the graphs from their code and never calls Dynamo;
anything else traces as usual."""

import dataclasses
import hashlib
import math
from pathlib import Path

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch import fx

from ..models.attention import SPLIT_OPS
from .backend import DirectCall, KilnBackend, Piece, PieceInfo

# The code Dynamo traces and the code that splits and rewrites what it traced: editing any of
# it must not restore a record made by the old code.
_PACKAGE = Path(__file__).resolve().parent.parent
TRACED_SOURCE = hashlib.sha256(b"".join(
    path.read_bytes() for folder in ("models", "compiler", "graphs")
    for path in sorted((_PACKAGE / folder).glob("*.py")))).hexdigest()

# Names FX puts in the globals of every generated forward.
_FX_GLOBALS = ("inf", "nan", "NoneType", "torch", "device", "fx_pytree", "pytree")


def _graph_code(gm: fx.GraphModule) -> dict | None:
    """The graph's forward as code, with the split ops it calls by name; None if it uses
    anything else that a new process could not find again."""
    code = gm.graph.python_code(root_module="self")
    calls = {}
    for name, value in code.globals.items():
        if name in _FX_GLOBALS:
            continue
        op = next((op for op, fn in SPLIT_OPS.items() if fn is value), None)
        if op is None:
            return None
        calls[name] = op
    return {"src": code.src, "calls": calls}


def _graph_state(gm: fx.GraphModule) -> dict | None:
    code = _graph_code(gm)
    if code is None:
        return None
    children = {}
    for name, child in gm.named_children():
        if isinstance(child, Piece):
            info = dataclasses.asdict(child.info)
            serves = ({child.info.static_size} if child.info.token_arg is None else
                      set(child.info.only_sizes or child.backend.sizes))
            if set(info["keys"]) != serves:  # a size never prepared
                return None
            info["keys"] = {str(size): key for size, key in info["keys"].items()}
            children[name] = {"piece": info}
        elif isinstance(child, fx.GraphModule) and (state := _graph_state(child)):
            children[name] = state
        else:
            return None
    return {"code": code, "children": children}


def describe(direct: dict[torch.nn.Module, DirectCall], model: torch.nn.Module) -> dict | None:
    """A record of the graphs that `direct` calls and which of `model`'s modules call which
    (None if one cannot be saved)."""
    names = {module: name for name, module in model.named_modules()}
    calls: list[dict] = []
    index: dict[int, int] = {}
    modules = {}
    for module, call in direct.items():
        if id(call) not in index:
            state = _graph_state(call.split)
            if state is None:
                return None
            index[id(call)] = len(calls)
            calls.append({"graph": state, "sources": call.sources})
        modules[names[module]] = index[id(call)]
    return {"calls": calls, "modules": modules}


def _rebuild(state: dict, backend: KilnBackend, pieces: list[Piece]) -> "RestoredGraph":
    children = {}
    for name, child in state["children"].items():
        if "piece" in child:
            info = PieceInfo(**child["piece"])
            info.keys = {int(size): key for size, key in info.keys.items()}
            piece = children[name] = Piece(None, info, backend)
            pieces.append(piece)
        else:
            children[name] = _rebuild(child, backend, pieces)
    return RestoredGraph(state["code"], children)


def restore(record: dict, model: torch.nn.Module,
            backend: KilnBackend) -> dict[torch.nn.Module, DirectCall] | None:
    """The calls of `model`'s modules rebuilt from a record, their pieces added to the
    backend; None, with the backend unchanged, unless every artifact they need is in the
    cache."""
    modules = dict(model.named_modules())
    if not set(record["modules"]) <= modules.keys():
        return None
    pieces: list[Piece] = []
    calls = [DirectCall(_rebuild(call["graph"], backend, pieces), call["sources"])
             for call in record["calls"]]
    keys = {key for piece in pieces for key in piece.info.keys.values()}
    if not all(backend.cache.contains(key) for key in keys):
        return None
    backend.pieces += pieces
    backend.counters.num_traces_restored += len(calls)
    return {modules[name]: calls[i] for name, i in record["modules"].items()}


class RestoredGraph(torch.nn.Module):
    """A split graph (or the attention call inside one) rebuilt from its code."""

    def __init__(self, code: dict, children: dict[str, torch.nn.Module]):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        scope = {"inf": math.inf, "nan": math.nan, "NoneType": type(None), "torch": torch,
                 "device": torch.device, "fx_pytree": fx_pytree, "pytree": pytree,
                 **{name: SPLIT_OPS[op] for name, op in code["calls"].items()}}
        exec(compile(code["src"], "<kiln restored graph>", "exec"), scope)
        self._forward = scope["forward"]

    def forward(self, *args):
        return self._forward(self, *args)
