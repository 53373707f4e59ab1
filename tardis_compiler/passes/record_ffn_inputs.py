"""Rewrite for calibration: before each selected FFN, call ``hook(x, name)`` on its input x.

The hook is calibration's ``record_ffn_input`` (``calibrate/record.py``, which builds recording
graphs with this pass: passes never import calibration). The recording graph computes exactly
what the original does (the hook returns nothing and changes nothing); it runs eagerly while
calibration data flows through it.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.fx import GraphModule

from .context import PassContext
from .find_ffns import ffn_input, linear_nodes


def record_ffn_inputs(gm: GraphModule, ctx: PassContext, hook: Callable[[torch.Tensor, str], None]) -> GraphModule:
    """Insert a call of ``hook(x, name)`` on each selected FFN's input.

    Example:
        >>> # calibrate/record.py: record_ffn_inputs(copy_graph_module(gm), ctx, record_ffn_input)
    """
    for match in ctx.selected(gm):
        with gm.graph.inserting_before(linear_nodes(match)[0]):
            gm.graph.call_function(hook, (ffn_input(match), match.name))
        ctx.log.append(f"record_ffn_inputs: {match.name}")
    gm.recompile()
    return gm
