"""TEAL/CATS-style activation sparsity baseline: per token, zero the smallest-magnitude entries of
each FFN matrix's input, so the matching weight columns need not be read.

Each FFN linear gets a magnitude threshold calibrated on the calibration tokens to hit a target
sparsity (a quantile of |x|). For the gated FFN ``down(act(gate(x)) * up(x))`` that sparsifies x
(read by gate and up) and the hidden activation (read by down); for BERT's plain FFN, the inputs of
``intermediate.dense`` and ``output.dense``. Bytes read per token are the columns actually needed,
counted while the model runs (``ActivationSparsityMeter``). All weights stay resident.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable

import torch

from .accounting import FFNBytes, PreparedModel
from .calibration_stats import ffn_input_stats
from .errors import check_budget
from .ffn import find_ffn_linears, set_submodule


class ThresholdSparseLinear(torch.nn.Module):
    """``linear(x * (|x| > threshold))``, counting the input columns it keeps.

    Example:
        >>> layer = ThresholdSparseLinear(torch.nn.Linear(3, 1), threshold=0.5)
        >>> _ = layer(torch.tensor([[0.1, -0.9, 0.6]]))
        >>> layer.kept_columns, layer.tokens
        (2, 1)
    """

    def __init__(self, linear: torch.nn.Linear, threshold: float) -> None:
        super().__init__()
        self.linear = linear
        self.threshold = float(threshold)
        self.kept_columns = 0
        self.tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = x.abs() > self.threshold
        self.kept_columns += int(keep.sum())
        self.tokens += keep.numel() // keep.shape[-1]
        return self.linear(x * keep)

    def read_per_token(self) -> float:
        """Weight bytes read per token so far: kept columns times column bytes."""
        weight = self.linear.weight
        column_bytes = weight.shape[0] * weight.element_size()
        return self.kept_columns / max(self.tokens, 1) * column_bytes

    def extra_repr(self) -> str:
        return f"threshold={self.threshold:.4g}"


class ActivationSparsityMeter:
    """Sums bytes read per token over a model's ``ThresholdSparseLinear`` layers."""

    def __init__(self, layers: list[ThresholdSparseLinear]) -> None:
        self.layers = layers

    def reset(self) -> None:
        """Start counting afresh (the harness calls this before the evaluation text)."""
        for layer in self.layers:
            layer.kept_columns = layer.tokens = 0

    def read_per_token(self) -> float:
        """FFN weight bytes read per token since the last reset."""
        return sum(layer.read_per_token() for layer in self.layers)


def teal(model: torch.nn.Module, batches: Iterable[Any], budget: float) -> PreparedModel:
    """Activation sparsity at ``budget``: every FFN matrix input gets sparsity ``1 - budget``, so
    each matrix reads ``budget`` of its columns per token on average over the calibration tokens.

    Example:
        >>> prepared = teal(model, batches, 0.5)
        >>> _ = prepared.model(batches[0])                 # the meter counts what the model reads
        >>> 0 < prepared.meter.read_per_token() < prepared.ffn_bytes.dense
        True
    """
    sparsity = 1.0 - check_budget(budget)
    stats = ffn_input_stats(model, batches)
    sparse = copy.deepcopy(model)
    layers, expected, dense_total, thresholds = [], 0.0, 0, {}
    for ffn in find_ffn_linears(sparse):
        threshold = stats[ffn.name].magnitude_quantile(sparsity)
        layer = ThresholdSparseLinear(ffn.module, threshold)
        set_submodule(sparse, ffn.name, layer)
        layers.append(layer)
        thresholds[ffn.name] = threshold
        kept = float((stats[ffn.name].abs_sample > threshold).float().mean())
        expected += kept * ffn.weight_bytes  # calibration estimate; the meter measures eval text
        dense_total += ffn.weight_bytes
    ffn_bytes = FFNBytes(read_per_token=expected, resident=dense_total, dense=dense_total)
    return PreparedModel(sparse, ffn_bytes, meter=ActivationSparsityMeter(layers),
                         details={"method": "teal", "target_sparsity": sparsity,
                                  "mean_threshold": sum(thresholds.values()) / len(thresholds)})
