"""Rewrite: replace each selected FFN, plain ``second(act(first(x)))`` or gated
``down(act(gate(x)) * up(x))``, by one ``tardis::ffn`` op.

The op reads the FFN's pack (``runtime/pack.py``): four extra graph inputs per FFN, appended after
the original placeholders in the graph order of the FFNs (``gm.meta["tardis_folded"]`` names them).
The caller (``runtime.graph_packs.GraphPacks``) finds the packs for the weights each call receives,
so nothing calibrated or folded is baked into the graph and one compiled graph serves every instance
and every profile. The FFN's own weights stay graph inputs: they key the packs.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ..runtime import ffn_op  # noqa: F401  (registers torch.ops.tardis.ffn)
from .context import PassContext


def fold_ffns(gm: GraphModule, ctx: PassContext) -> GraphModule:
    """Replace each selected FFN with the fused op; returns ``gm`` with four new inputs per FFN.

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
        pack = []
        for part in PACK_INPUTS:
            with graph.inserting_after(last_placeholder):
                last_placeholder = graph.placeholder(f"tardis_{part}_{len(names)}")
            pack.append(last_placeholder)
        names.append(match.name)
        _replace(graph, match, pack)
        ctx.log.append(f"fold_ffns: {match.name}: {match.pattern} -> tardis.ffn")
    gm.meta["tardis_folded"] = names
    graph.lint()
    gm.recompile()
    return gm


PACK_INPUTS = ("weights", "guard", "floats", "meta")


def _replace(graph: torch.fx.Graph, match, pack: list[Node]) -> None:
    if match.kind == "gated":
        x, last = match.gate.x, match.down.node
    else:
        x, last = match.first.x, match.second.node
    with graph.inserting_before(last):
        out = graph.call_function(torch.ops.tardis.ffn.default,
                                  (x, *pack, match.d_out, match.activation.name, match.name))
        if match.kind == "plain" and _rank(last) != _rank(x):  # Conv1D flattens tokens to 2-D around addmm
            out = graph.call_method("reshape", (out, -1, match.d_out))
    last.replace_all_uses_with(out)
    _erase_dead_upstream(graph, last)


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
