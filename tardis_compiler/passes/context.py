"""What every pass gets: the options, the profile, and which FFNs to touch; plus graph helpers."""
from __future__ import annotations

import dataclasses

import torch
from torch.fx import GraphModule, Node

from ..config import TardisOptions
from .find_ffns import FFNMatch, find_ffns, placeholder_fqn as _fqn_of


@dataclasses.dataclass
class PassContext:
    """Shared state of one graph's pipeline. ``names`` restricts the rewrite to those FFNs."""

    options: TardisOptions
    names: set[str]
    log: list[str] = dataclasses.field(default_factory=list)

    def selected(self, gm: GraphModule) -> list[FFNMatch]:
        """The FFNs of ``gm`` this pipeline rewrites, found afresh (passes work on copies)."""
        matches, _ = find_ffns(gm, placeholder_fqns(gm))
        return [m for m in matches if m.name in self.names]


def placeholder_fqns(gm: GraphModule) -> dict[Node, str]:
    """Map each placeholder that is model state (a parameter or buffer) to its FQN."""
    out = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        fqn = _fqn_of(node)
        if fqn is not None:
            out[node] = fqn
    return out


def copy_graph_module(gm: GraphModule) -> GraphModule:
    """A fresh GraphModule over a copy of ``gm``'s graph (node meta kept), safe to rewrite.

    A *fresh* module also avoids a trap: compile_fx crashes on dynamo's own gm once attributes
    are added to it (DESIGN section 3).
    """
    graph = torch.fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return GraphModule(gm, graph)
