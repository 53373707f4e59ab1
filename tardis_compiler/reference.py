"""The model a quantized pack is exact against: ``quantized_reference(model, inputs)``.

With ``CalibrationConfig(weights="int8")`` the exactness invariant is stated against the dense
model whose FFN weights are their int8 codes times their scales (``"int4"``: their int4 groups'
values; ``runtime/quantize.py``): a
``guard="all"`` compression reproduces it up to float32 rounding, and calibration fits and prices
against it. This builds that model, as a copy: the FFNs are found the way ``compress_`` finds
them (the dynamo graph of one example call), and each one's neuron-major weight views are
overwritten with the reference's values. Every other weight is the model's own.
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from .passes.context import ffn_slots
from .runtime.quantize import reference_weights


def quantized_reference(model: torch.nn.Module, example_inputs: Any = None, weights: str = "int8") -> torch.nn.Module:
    """A copy of ``model`` whose FFN weights hold the values a ``weights`` quantized pack reads
    (W1 / W_g / W_u per row, W2 / W_d per neuron; biases as they are). ``model`` is not changed.
    ``example_inputs`` as for ``compress_``.

    Example:
        >>> import torch, tardis_compiler as tc
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
        >>> ref = tc.quantized_reference(mlp, torch.randn(2, 16))
        >>> len(ref[0].weight.unique(dim=1)) <= 16 * 255, torch.equal(ref[0].bias, mlp[0].bias)
        (True, True)
    """
    from .compress import model_ffns  # compress imports the backend, which imports passes

    reference = copy.deepcopy(model)
    done: set[str] = set()
    with torch.no_grad():
        for match, _fqns, (positions, values) in model_ffns(reference, example_inputs):
            if "#" in match.name:  # shared weights: quantized once, by their first FFN
                continue
            done.add(match.name)
            views = ffn_slots(match, positions).weights(values)
            for key, value in reference_weights(match.kind, views, weights).items():
                if value is not views[key]:
                    views[key].copy_(value)
    if not done:
        raise ValueError("quantized_reference() found no FFN in this model; tardis_compiler.explain(model, inputs) "
                         "lists what was matched and why")
    return reference
