"""Rewrite: replace each selected FFN by one fused op: ``second(act(first(x)))`` by
``tardis::folded_ffn``, a gated ``down(act(gate(x)) * up(x))`` by ``tardis::gated_ffn``.

The op takes the *weights themselves* (graph inputs, so a reused graph folds the weights it is
given) and one extra graph input per FFN: the (6, m) calibration tensor of ``FFNProfile.params``,
appended after the original placeholders in the graph order of the FFNs (``gm.meta["tardis_folded"]``
names them). The caller passes those tensors after the original inputs, so nothing calibrated is
baked into the graph and one compiled graph serves every instance and every profile.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ..runtime import gated_ops, ops  # noqa: F401  (register torch.ops.tardis.folded_ffn, gated_ffn)
from .context import PassContext
from .find_gated_ffns import GatedFFNMatch


def fold_ffns(gm: GraphModule, ctx: PassContext) -> GraphModule:
    """Replace each selected FFN with the fused op; returns ``gm`` with one new input per FFN.

    ``ctx.log`` gets one line per rewrite; ``gm.meta["tardis_folded"]`` lists the folded FFN names
    in the order of their new inputs.

    Example:
        >>> # built by the backend: fold_ffns(copy_graph_module(gm), ctx)
    """
    graph = gm.graph
    matches = ctx.selected(gm)
    last_placeholder = list(graph.find_nodes(op="placeholder"))[-1]
    names = []
    for match in matches:
        with graph.inserting_after(last_placeholder):
            params = graph.placeholder(f"tardis_params_{len(names)}")
        last_placeholder = params
        names.append(match.name)
        _replace(graph, match, params, ctx)
        op = "gated_ffn" if match.kind == "gated" else "folded_ffn"
        ctx.log.append(f"fold_ffns: {match.name}: {match.pattern} -> tardis.{op}")
    gm.meta["tardis_folded"] = names
    graph.lint()
    gm.recompile()
    return gm


def _replace(graph: torch.fx.Graph, match, params: Node, ctx: PassContext) -> None:
    if match.kind == "gated":
        _replace_gated(graph, match, params, ctx)
        return
    first, second = match.first, match.second
    opts = ctx.options
    with graph.inserting_before(second.node):
        fused = graph.call_function(
            torch.ops.tardis.folded_ffn.default,
            (first.x, first.weight, first.bias, second.weight, second.bias, params, match.name,
             match.activation.name, first.layout, second.layout, opts.guard_for("plain"),
             opts.calibration.group_size, opts.dense_above),
        )
        out = fused
        if _rank(second.node) != _rank(first.x):  # Conv1D flattens tokens to 2-D around addmm
            out = graph.call_method("reshape", (fused, -1, match.d_out))
    second.node.replace_all_uses_with(out)
    _erase_dead_upstream(graph, second.node)


def _replace_gated(graph: torch.fx.Graph, match: GatedFFNMatch, params: Node, ctx: PassContext) -> None:
    gate, up, down = match.gate, match.up, match.down
    opts = ctx.options
    with graph.inserting_before(down.node):
        fused = graph.call_function(
            torch.ops.tardis.gated_ffn.default,
            (gate.x, gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias, params, match.name,
             match.activation.name, match.gate_offset, match.up_offset, opts.guard_for("gated"),
             opts.calibration.group_size, opts.dense_above),
        )
    down.node.replace_all_uses_with(fused)
    _erase_dead_upstream(graph, down.node)


def _rank(node: Node) -> int:
    value = node.meta.get("example_value")
    return value.dim() if isinstance(value, torch.Tensor) else -1


def _erase_dead_upstream(graph: torch.fx.Graph, node: Node) -> None:
    """Erase ``node`` and whatever fed only it (the old FFN body), stopping at placeholders."""
    stack, erased = [node], set()
    while stack:
        n = stack.pop()
        if n in erased or n.users or n.op in ("placeholder", "output"):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        erased.add(n)
        stack.extend(inputs)
