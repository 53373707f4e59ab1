"""Match: find every FFN of a dynamo FX graph, gated and plain, and name each one.

Gated FFNs ``down(act(gate(x)) * up(x))`` are matched first (``find_gated_ffns``): their gate
and up linears each look like the first linear of a plain FFN. The plain matcher
(``find_plain_ffns``) then takes the linears left. Matches come back in graph order, named by the
module their linears share.
"""
from __future__ import annotations

from torch.fx import GraphModule, Node

from .ffn_graph import SkippedFFN, module_of
from .find_gated_ffns import GatedFFNMatch, find_gated_ffns
from .find_plain_ffns import FFNMatch, find_plain_ffns


def find_ffns(gm: GraphModule, fqns: dict[Node, str]) -> tuple[list[FFNMatch | GatedFFNMatch], list[SkippedFFN]]:
    """Find the FFNs in ``gm``, plain (``FFNMatch``) and gated (``GatedFFNMatch``, see
    find_gated_ffns.py); ``fqns`` maps parameter placeholders to their module FQNs.

    Returns the matches (graph order) and the FFN-shaped patterns that were declined.

    Example:
        >>> import torch
        >>> from tardis_compiler.passes import capture_graphs
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        >>> (gm, fqns), = capture_graphs(mlp, torch.randn(2, 8))
        >>> [m.name for m in find_ffns(gm, fqns)[0]]
        ['']
    """
    matches, skipped = find_gated_ffns(gm, fqns)
    claimed: set[Node] = {n for m in matches for n in linear_nodes(m)}
    plain, plain_skipped = find_plain_ffns(gm, fqns, claimed)
    matches, skipped = [*matches, *plain], [*skipped, *plain_skipped]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    matches.sort(key=lambda m: order[linear_nodes(m)[-1]])
    _dedupe_names(matches, fqns)
    return matches, skipped


def linear_nodes(match) -> list[Node]:
    """The result nodes of an FFN match's linears, the output linear last."""
    return [spec.node for spec in match.linears]


def ffn_input(match) -> Node:
    """The node an FFN match reads its tokens from."""
    return match.linears[0].x


def _dedupe_names(matches: list[FFNMatch], fqns: dict[Node, str]) -> None:
    # Two FFNs under one module (rare) are named by their first linear's module instead. FFNs that
    # still share a name (weights tied between layers: one parameter, one FQN) are told apart by
    # their graph order, "name#1", "name#2", ..., so each is calibrated with its own inputs and biases.
    counts: dict[str, int] = {}
    for m in matches:
        counts[m.name] = counts.get(m.name, 0) + 1
    for m in matches:
        if counts[m.name] > 1:
            m.name = module_of(fqns[m.linears[0].weight])
    seen: dict[str, int] = {}
    for m in matches:
        k = seen.get(m.name, 0)
        seen[m.name] = k + 1
        if k:
            m.name = f"{m.name}#{k}"
