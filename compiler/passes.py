"""kiln's own FX passes, run on a graph piece before Inductor compiles it for one size."""

import torch
import torch.nn.functional as F
from torch import fx

_LINEAR = (torch._C._nn.linear, F.linear)


def single_token_linear_as_reduction(gm: fx.GraphModule) -> int:
    """In a piece compiled for one token, compute y = x W^T as sum(x * W, -1).

    For one row, a BLAS call is a matrix-vector product behind an opaque call: Inductor
    cannot fuse anything into it, and on this machine's CPU it streams weights at about
    7 GB/s. Written as a broadcast multiply and a row reduction, the product becomes an
    ordinary Inductor reduction: one vectorised pass over W, fused with what produces x
    (RMSNorm, SiLU·mul) and what consumes y (rotary, residual add). Returns the number of
    linears rewritten. Only for a token count of 1: for more rows the reduction would read
    W once per row."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _LINEAR:
            continue
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        graph = gm.graph
        with graph.inserting_before(node):
            row = _with_value(graph.call_method("unsqueeze", (x, -2)))
            product = _with_value(graph.call_function(torch.mul, (row, weight)))
            out = _with_value(graph.call_method("sum", (product, -1)))
            if bias is not None:
                out = _with_value(graph.call_function(torch.add, (out, bias)))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        rewritten += 1
    gm.recompile()
    return rewritten


def _with_value(node: fx.Node) -> fx.Node:
    """Give a new node the fake example value later stages read from Dynamo's nodes."""
    def value(arg):
        return arg.meta["example_value"] if isinstance(arg, fx.Node) else arg

    args = [value(a) for a in node.args]
    if node.op == "call_method":
        node.meta["example_value"] = getattr(args[0], node.target)(*args[1:])
    else:
        node.meta["example_value"] = node.target(*args)
    return node


def count_linears(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in _LINEAR)
