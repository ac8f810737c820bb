"""kiln's own FX passes, run on the graph Dynamo traced, before it is split at attention."""

import operator

from torch import fx

_ATTENTION = "kiln.paged_attention"


def is_attention(node: fx.Node) -> bool:
    return node.op == "call_function" and _ATTENTION in str(node.target)


def _is_pure(node: fx.Node) -> bool:
    if node.op == "call_method":
        return not node.target.endswith("_")
    if node.op != "call_function" or is_attention(node):
        return False
    name = getattr(node.target, "__name__", "")
    return not name.endswith("_") and node.target is not operator.setitem


def _key(node: fx.Node) -> tuple:
    def freeze(value):
        if isinstance(value, (list, tuple)):
            return tuple(freeze(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, freeze(v)) for k, v in value.items()))
        if isinstance(value, slice):
            return ("slice", freeze(value.start), freeze(value.stop), freeze(value.step))
        return value

    return node.op, node.target, freeze(node.args), freeze(node.kwargs)


def dedupe_input_computations(gm: fx.GraphModule) -> int:
    """Merge identical pure computations that depend only on graph inputs.

    Every decoder layer gathers the same rotary cos/sin rows for the same positions. Inside
    one graph Inductor would merge them, but the graph is split at each attention call, and
    each piece would gather again. Merged here, the first piece computes them once and the
    later pieces receive the result as an input. Returns the number of nodes removed."""
    input_only: set[fx.Node] = set()
    seen: dict[tuple, fx.Node] = {}
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op == "placeholder":
            input_only.add(node)
            continue
        if not _is_pure(node) or not all(a in input_only for a in node.all_input_nodes):
            continue
        try:
            key = _key(node)
            hash(key)
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
            removed += 1
        else:
            seen[key] = node
            input_only.add(node)
    gm.recompile()
    return removed


PASSES = {"dedupe_input_computations": dedupe_input_computations}


def count_calls(gm: fx.GraphModule, predicate) -> int:
    return sum(1 for n in gm.graph.nodes if predicate(n))


