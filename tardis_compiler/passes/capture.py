"""Capture: a model's dynamo graphs, as the passes see them, without rewriting anything.

What ``compress_`` and ``quantized_reference`` find FFNs in, and what tests and users inspect.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule

from .context import copy_graph_module, placeholder_fqns


def capture_graphs(model: torch.nn.Module, *inputs: Any, **kwargs: Any) -> list[tuple[GraphModule, dict]]:
    """Capture ``model``'s dynamo graphs on ``inputs`` (for tests and inspection), with their
    parameter-placeholder FQNs. Runs the model eagerly; nothing is rewritten.

    Example:
        >>> lin = torch.nn.Linear(4, 4)
        >>> (gm, fqns), = capture_graphs(lin, torch.randn(2, 4))
        >>> sorted(fqns.values())
        ['bias', 'weight']
    """
    graphs = []

    def backend(gm, example_inputs, **_):
        # Copy now: dynamo drops the placeholders' source info (our FQNs) once compilation ends.
        copy = copy_graph_module(gm)
        graphs.append((copy, placeholder_fqns(copy)))
        return gm.forward

    # Its own recompile region: a fresh backend per capture must not exhaust dynamo's recompile limit.
    with torch.no_grad():
        torch.compile(model, backend=backend, isolate_recompiles=True)(*inputs, **kwargs)
    return graphs
