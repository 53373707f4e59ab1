"""Rewrite: replace each selected FFN, plain ``second(act(first(x)))`` or gated
``down(act(gate(x)) * up(x))``, by one ``tardis::ffn`` op.

The op reads the FFN's pack (``runtime/pack.py``): four extra graph inputs per FFN, appended after
the original placeholders in the graph order of the FFNs (``gm.meta["tardis_folded"]`` names them).
The caller (``runtime.graph_packs.GraphPacks``) finds the packs for the weights each call receives,
so nothing calibrated or folded is baked into the graph and one compiled graph serves every instance
and every profile. The FFN's own weights stay graph inputs: they key the packs, and the op gets
views of them in ``nn.Linear`` layout so that calls of more than ``dense_above`` tokens (prefill)
run the dense FFN where that is faster (``runtime/ffn_op.py``).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from ..runtime.ffn_op import dense_above_for  # also registers torch.ops.tardis.ffn
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
    packs = []
    for match in matches:
        pack = []
        for part in PACK_INPUTS:
            with graph.inserting_after(last_placeholder):
                last_placeholder = graph.placeholder(f"tardis_{part}_{len(names)}")
            pack.append(last_placeholder)
        names.append(match.name)
        packs.append(pack)
    # Last FFN first: an FFN's input may be the output node of the one before it (chained FFNs),
    # which replacing that one erases; replaced later, the new op takes its place in every use.
    for match, pack in reversed(list(zip(matches, packs))):
        _replace(graph, match, pack, ctx.options.dense_above)
        ctx.log.append(f"fold_ffns: {match.name}: {match.pattern} -> tardis.ffn")
    gm.meta["tardis_folded"] = names
    graph.lint()
    gm.recompile()
    return gm


PACK_INPUTS = ("weights", "guard", "floats", "meta")


def folded_in_order(matches: list, folded: GraphModule) -> list:
    """``matches`` in the order of the pack inputs ``fold_ffns`` gave ``folded``."""
    by_name = {m.name: m for m in matches}
    return [by_name[n] for n in folded.meta["tardis_folded"]]


def _replace(graph: torch.fx.Graph, match, pack: list[Node], dense_above: str | int | None) -> None:
    x, last = match.linears[0].x, match.linears[-1].node
    with graph.inserting_before(last):
        dense = _dense_weights(graph, match)
        out = graph.call_function(torch.ops.tardis.ffn.default,
                                  (x, *pack, match.d_out, match.activation.name, match.name,
                                   _dense_above(dense_above, x), dense))
        if _rank(last) != _rank(x):  # Conv1D flattens tokens to 2-D around addmm
            out = graph.call_method("reshape", (out, -1, match.d_out))
    last.replace_all_uses_with(out)
    _erase_dead_upstream(graph, last)


def _dense_weights(graph: torch.fx.Graph, match) -> list[Node | None]:
    """Views of the FFN's weights and biases in ``nn.Linear`` layout (weight (out, in)), as the op's
    dense path takes them: no copy."""
    def linear(spec, offset: int | None = None) -> list[Node | None]:
        weight, bias = spec.weight, spec.bias
        if spec.layout == "in_out":
            weight = graph.call_method("t", (weight,))
        rows = weight.meta.get("example_value")
        fused = offset is not None and (offset or (isinstance(rows, torch.Tensor) and rows.shape[0] != match.d_hidden))
        if fused:  # gate and up are row blocks of one fused weight
            weight = graph.call_function(torch.narrow, (weight, 0, offset, match.d_hidden))
            if bias is not None:
                bias = graph.call_function(torch.narrow, (bias, 0, offset, match.d_hidden))
        return [weight, bias]

    offsets = (*match.offsets, None)  # the output linear is never a fused block
    return [node for spec, offset in zip(match.linears, offsets) for node in linear(spec, offset)]


def _dense_above(option: str | int | None, x: Node) -> int:
    """The op's ``dense_above`` for the option value: "auto" is the measured figure for x's dtype."""
    if option is None:
        return -1
    if option == "auto":
        value = x.meta.get("example_value")
        return dense_above_for(value.dtype if isinstance(value, torch.Tensor) else torch.float32)
    return int(option)


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
