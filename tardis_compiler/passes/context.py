"""What every pass gets: the options, the profile, and which FFNs to touch; plus graph helpers
shared by the tardis backend and the recording backend (copies, parameter FQNs, where an FFN's
weights sit among the graph's inputs, and the refusal of training graphs)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from ..options import TardisOptions
from ..runtime.ffn_kind import ffn_kind
from ..runtime.graph_packs import FFNSlots
from .ffn_graph import placeholder_fqn as _fqn_of
from .find_ffns import find_ffns
from .find_gated_ffns import GatedFFNMatch
from .find_plain_ffns import FFNMatch


class TrainingModeError(ValueError):
    """The captured graph trains (dropout active): folding weights is not valid there."""


@dataclasses.dataclass
class PassContext:
    """Shared state of one graph's pipeline. ``names`` restricts the rewrite to those FFNs."""

    options: TardisOptions
    names: set[str]
    log: list[str] = dataclasses.field(default_factory=list)

    def selected(self, gm: GraphModule) -> list[FFNMatch | GatedFFNMatch]:
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


def ffn_slots(match: FFNMatch | GatedFFNMatch, positions: dict[Node, int]) -> FFNSlots:
    """Where an FFN's weights sit among the graph's inputs (``positions``: placeholder -> index).

    Example:
        >>> # slots = [ffn_slots(m, positions) for m in find_ffns(gm, placeholder_fqns(gm))[0]]
    """
    spec = ffn_kind(match.kind)
    slots = {}
    for name, linear in zip(spec.letters, match.linears):
        slots[f"w{name}"], slots[f"b{name}"] = positions[linear.weight], positions.get(linear.bias)
    return FFNSlots(match.name, spec.name, match.activation.name, slots, match.d_hidden, pattern=match.pattern,
                    layouts=tuple(linear.layout for linear in match.linears), offsets=match.offsets)


def refuse_training_graph(gm: GraphModule) -> None:
    """Raise ``TrainingModeError`` if ``gm`` runs dropout in training mode: folding weights is an
    inference transform, and so is calibrating for it.

    Example:
        >>> # refuse_training_graph(gm)   # before matching, in both backends
    """
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.dropout:
            training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            if training is True:
                raise TrainingModeError(
                    "tardis folds weights for inference, but this model is in training mode "
                    f"(dropout is active at {node.name!r}). Call model.eval() before compiling "
                    "with backend='tardis'.")
