"""kiln's own FX passes, run on a graph piece before Inductor compiles it for one size."""

import torch
import torch.nn.functional as F
from torch import fx

# Imported for the ops they define: kiln::linear_row, kiln::linear_packed
from ..models import cpu_linear, cpu_packed_linear  # noqa: F401

_LINEAR = (torch._C._nn.linear, F.linear)

# Inductor settings for pieces the single-token pass rewrote. Inductor recomputes a
# pointwise value inside each consumer's loop until it has read more than this many buffers
# (12 on CPU in torch 2.13): a normalized input x (residual, sum of squares, norm weight)
# would then be recomputed for every weight row of the reduction that consumes it, tripling
# the loads of its inner loop. At 2, x is computed once into a buffer: 1.4 ms of a 40 ms
# batch-1 decode step of SmolLM2 here (interleaved A/B runs, both orders), greedy tokens
# unchanged.
SINGLE_TOKEN_INDUCTOR_OPTIONS = {"realize_acc_reads_threshold": 2}


def single_token_linear_as_reduction(gm: fx.GraphModule) -> int:
    """In a piece compiled for one token, compute y = x W^T as sum(x * W, -1).

    For one row, a BLAS call is a matrix-vector product behind an opaque call: Inductor
    cannot fuse anything into it, and on this machine's CPU it streams weights at about
    7 GB/s. Written as a broadcast multiply and a row reduction, the product becomes an
    ordinary Inductor reduction: one vectorised pass over W, fused with what produces x
    (RMSNorm, SiLU·mul) and what consumes y (rotary, residual add). Returns the number of
    linears rewritten. Only for a token count of 1: for more rows the reduction would read
    W once per row."""
    def build(graph: fx.Graph, x: fx.Node, weight: fx.Node) -> fx.Node:
        row = _with_value(graph.call_method("unsqueeze", (x, -2)))
        product = _with_value(graph.call_function(torch.mul, (row, weight)))
        return _with_value(graph.call_method("sum", (product, -1)))

    return _rewrite_linears(gm, build)


def single_token_linear_as_row_kernel(gm: fx.GraphModule) -> int:
    """In a piece compiled for one token on CPU, compute y = x W^T with kiln's row kernel
    (`kiln::linear_row`, models/cpu_linear.py) instead of a reduction Inductor generates.

    Inductor still fuses what produces x and what consumes y into its kernels around the
    call. Returns the number of linears rewritten."""
    def build(graph: fx.Graph, x: fx.Node, weight: fx.Node) -> fx.Node:
        return _with_value(graph.call_function(torch.ops.kiln.linear_row.default, (x, weight)))

    return _rewrite_linears(gm, build)


def linear_as_weight_times_input(gm: fx.GraphModule) -> int:
    """In a piece compiled for a few rows, compute y = x W^T as (W x^T)^T.

    Both are one BLAS call on the same memory; they differ in which operand BLAS walks as the
    outer matrix. With x short (a decode batch), MKL on this machine runs W x^T 1.3-3.5x
    faster than x W^T for SmolLM2's projections at 32 rows (the gate_up projection: 1.0 ms
    against 3.5 ms). Returns the number of linears rewritten."""
    def build(graph: fx.Graph, x: fx.Node, weight: fx.Node) -> fx.Node | None:
        if x.meta["example_value"].dim() != 2:
            return None
        x_t = _with_value(graph.call_method("t", (x,)))
        product = _with_value(graph.call_function(torch.matmul, (weight, x_t)))
        out = _with_value(graph.call_method("t", (product,)))
        # Row-major again: a piece's outputs feed pieces compiled for row-major inputs
        # (Inductor fuses the copy into the consumer where it can).
        return _with_value(graph.call_method("contiguous", (out,)))

    return _rewrite_linears(gm, build)


def linear_with_packed_weights(gm: fx.GraphModule) -> int:
    """In a piece compiled for several rows on CPU, compute y = x W^T with oneDNN and W's
    packed copy (`kiln::linear_packed`, models/cpu_packed_linear.py) instead of MKL on the
    plain W. Returns the number of linears rewritten."""
    def build(graph: fx.Graph, x: fx.Node, weight: fx.Node) -> fx.Node | None:
        if x.meta["example_value"].dim() != 2:
            return None
        return _with_value(graph.call_function(torch.ops.kiln.linear_packed.default,
                                               (x, weight)))

    return _rewrite_linears(gm, build)


def _rewrite_linears(gm: fx.GraphModule, build) -> int:
    """Replace each linear y = x W^T (+ b) by what `build(graph, x, W)` inserts before it
    (a linear it returns None for stays); returns the number replaced."""
    rewritten = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _LINEAR:
            continue
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with graph.inserting_before(node):
            out = build(graph, x, weight)
            if out is None:
                continue
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
