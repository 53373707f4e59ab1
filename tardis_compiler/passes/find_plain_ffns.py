"""Match: find every plain FFN ``linear -> activation -> linear`` in a dynamo FX graph.

"Anchor and walk" rather than subgraph isomorphism, because real graphs spell the same FFN many
ways (``linear``; GPT-2 Conv1D ``addmm`` between views; Falcon ``x @ W.T``; activations as one op
or as a formula spread over ten nodes). For every linear whose weight is a model parameter we:

1. walk down through shape-only ops (view/reshape/eval-mode dropout) to the activation input z;
2. grow the elementwise region fed by z alone, and require it to have one exit, consumed
   (through shape-only ops) by another parameter-fed linear;
3. evaluate the region on a probe vector and look it up in the activation registry.

Anything FFN-shaped that fails a check is reported with the reason and left untouched. The graph
vocabulary is ``ffn_graph.py``'s; ``find_ffns`` runs this matcher after the gated one.
"""
from __future__ import annotations

import dataclasses
import re

from torch.fx import GraphModule, Node

from ..activations import ActivationRule
from .ffn_graph import (LinearSpec, SkippedFFN, as_linear, elementwise_region, identify_region, is_shape_only,
                        last_dim_of, module_of, same_token_layout, single_user, static_eq, target_name)

_NONLINEAR_HINT = re.compile(r"gelu|relu|silu|sigmoid|tanh|erf|exp|softplus|mish|elu|swish|pow|clamp|maximum|where|abs")


@dataclasses.dataclass
class FFNMatch:
    """One plain FFN found in a graph: ``second(act(first(x)))``."""

    name: str
    first: LinearSpec
    second: LinearSpec
    activation: ActivationRule
    region: list[Node]
    pattern: str
    kind: str = "plain"

    @property
    def linears(self) -> tuple[LinearSpec, ...]:
        """The FFN's linears in its kind's order (``runtime/ffn_kind.py``), the output linear last."""
        return (self.first, self.second)

    @property
    def offsets(self) -> tuple[int | None, ...]:
        """Row offsets of the input linears' neurons in fused weights: none for a plain FFN."""
        return (None,)

    @property
    def d_in(self) -> int:
        return self.first.in_features

    @property
    def d_hidden(self) -> int:
        return self.first.out_features

    @property
    def d_out(self) -> int:
        return self.second.out_features


def find_plain_ffns(gm: GraphModule, fqns: dict[Node, str],
                    claimed: set[Node] = frozenset()) -> tuple[list[FFNMatch], list[SkippedFFN]]:
    """Find the plain FFNs of ``gm`` (graph order of their first linear), skipping linears in
    ``claimed`` (those of gated FFNs found first); a linear an FFN takes is not tried again.

    Example:
        >>> import torch
        >>> from tardis_compiler.passes import capture_graphs
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> (gm, fqns), = capture_graphs(mlp, torch.randn(2, 8))
        >>> (match,), skipped = find_plain_ffns(gm, fqns)
        >>> match.activation.name, (match.d_in, match.d_hidden, match.d_out), skipped
        ('relu', (8, 32, 8), [])
    """
    claimed = set(claimed)
    matches: list[FFNMatch] = []
    skipped: list[SkippedFFN] = []
    for node in gm.graph.nodes:
        first = as_linear(node, fqns)
        if first is None or first.node in claimed:
            continue
        result = _match_from(first, fqns)
        if result is None:
            continue
        if isinstance(result, SkippedFFN):
            skipped.append(result)
            continue
        claimed.update({result.first.node, result.second.node})
        matches.append(result)
    return matches, skipped


def _match_from(first: LinearSpec, fqns: dict[Node, str]) -> FFNMatch | SkippedFFN | None:
    z = _follow_shape_only(first.node, first.out_features)
    region, exits = elementwise_region(z)
    if not region or not any(_looks_nonlinear(n) for n in region):
        return None  # two linears in a row, or no activation at all: not an FFN
    name = _ffn_name(first, None, fqns)
    if len(exits) != 1:
        if not any(_feeds_linear(consumer, first.out_features, fqns) for _, consumer in exits):
            return None  # e.g. a norm's pow(2) right after a projection: not an activation
        return SkippedFFN(name, "linear -> ?", f"activation output is used {len(exits)} times; a plain FFN needs one")
    exit_node, consumer = exits[0]
    second_node = _follow_shape_only_to_consumer(consumer, first.out_features)
    second = as_linear(second_node, fqns) if second_node is not None else None
    if second is None:
        return None  # gated FFNs (act(g) * u) are find_gated_ffns'; else e.g. a pooler's tanh: not an FFN
    name = _ffn_name(first, second, fqns)
    pattern = f"{first.spelling} -> {{act}} -> {second.spelling}"
    if second.in_features != first.out_features:
        return SkippedFFN(name, pattern.format(act="?"), "hidden sizes of the two linears differ")
    if not same_token_layout(first, second):
        return SkippedFFN(name, pattern.format(act="?"),
                          "views between the linears change the token layout; cannot fuse safely")
    rule, how = identify_region(region, z, exit_node)
    if rule is None:
        return SkippedFFN(name, pattern.format(act=how),
                          "unrecognised activation: register it with tardis_compiler.register_activation_rule")
    return FFNMatch(name, first, second, rule, region, pattern.format(act=f"{rule.name} ({how})"))


def _feeds_linear(consumer: Node, last_dim: int, fqns: dict[Node, str]) -> bool:
    node = _follow_shape_only_to_consumer(consumer, last_dim)
    return node is not None and as_linear(node, fqns) is not None


def _follow_shape_only(node: Node, last_dim: int) -> Node:
    while True:
        nxt = single_user(node)
        if nxt is None or not is_shape_only(nxt) or not static_eq(last_dim_of(nxt), last_dim):
            return node
        node = nxt


def _follow_shape_only_to_consumer(node: Node, last_dim: int) -> Node | None:
    while is_shape_only(node):
        if not static_eq(last_dim_of(node), last_dim):
            return None
        node = single_user(node)
        if node is None:
            return None
    return node


def _looks_nonlinear(node: Node) -> bool:
    return bool(_NONLINEAR_HINT.search(target_name(node)))


def _ffn_name(first: LinearSpec, second: LinearSpec | None, fqns: dict[Node, str]) -> str:
    a = module_of(fqns[first.weight]).split(".")
    if second is None:
        return ".".join(a)
    b = module_of(fqns[second.weight]).split(".")
    common = []
    for x, y in zip(a, b):
        if x != y:
            break
        common.append(x)
    return ".".join(common)
