"""Rewrite for calibration: after each selected FFN's input, call ``record_ffn_input(x, name)``.

The recording graph computes exactly what the original does (the hook returns nothing and changes
nothing); it runs eagerly while calibration data flows through it.
"""
from __future__ import annotations

from torch.fx import GraphModule

from ..calibrate import record_ffn_input
from .context import PassContext
from .find_ffns import ffn_input, linear_nodes


def record_ffn_inputs(gm: GraphModule, ctx: PassContext) -> GraphModule:
    """Insert a recording hook on each selected FFN's input.

    Example:
        >>> # built by the backend: record_ffn_inputs(copy_graph_module(gm), ctx)
    """
    for match in ctx.selected(gm):
        with gm.graph.inserting_before(linear_nodes(match)[0]):
            gm.graph.call_function(record_ffn_input, (ffn_input(match), match.name))
        ctx.log.append(f"record_ffn_inputs: {match.name}")
    gm.recompile()
    return gm
