"""Margins: the guard's predictor and the margins of its flag band, for both FFN kinds.

A guard predicts each neuron's pre-activation from a cheap copy of the
first weight (``predictor_for``: a low-bit copy, or SVDP's whitened low-rank factors), and flags
the neuron for the exact path when the prediction comes within a margin of its range's ends:

- low-bit guards (``recall_margins``): ``s * std(z_hat_i - z_i)`` per neuron, with one scale s
  per FFN, the smallest that flags ``target_recall`` of the out-of-range inputs;
- "svd" (``guard_margins``): SVDP's greedy per-neuron thresholds, leaving at most
  1 - target_recall of the out-of-range error unflagged;
- "exact" and "all" have no predictor and no margin.
"""
from __future__ import annotations

import math

import torch

from ..config import LOW_BIT_GUARDS, CalibrationConfig
from ..runtime.guard import LowBitGuard
from ..runtime.svd_predictor import SVDPredictor, greedy_margins


def recall_margins(z: torch.Tensor, z_hat: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                   target_recall: float, max_scale: float = 64.0, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Per-neuron guard margins ``s * std(z_hat - z)``, with the smallest scale s (one per FFN)
    whose flags catch ``target_recall`` of the out-of-range (token, neuron) pairs.

    Misses happen only near the range's ends (far outliers are flagged with any margin), so a
    recall target needs far less margin than a high quantile of the prediction error. Computed in
    one pass: an out-of-range pair is flagged once s exceeds its critical scale
    ``min(z_hat - lower, upper - z_hat) / std``, so s is a quantile of those critical scales.
    ``sigma`` (the per-neuron std of ``z_hat - z``) may be passed when calling for many ranges.

    Example:
        >>> z = torch.randn(1000, 4); z_hat = z + 0.1 * torch.randn(1000, 4)
        >>> m = recall_margins(z, z_hat, torch.full((4,), -1.0), torch.full((4,), 1.0), 0.99)
        >>> bool((m > 0).all() and (m < 0.5).all())
        True
    """
    sigma = (z_hat - z).std(dim=0) if sigma is None else sigma
    outside = (z < lower) | (z > upper)
    total = int(outside.sum())
    if total == 0:
        return torch.zeros_like(sigma)
    # Flagged iff z_hat < lower + s*sigma or z_hat > upper - s*sigma, i.e. iff s > critical.
    critical = (torch.minimum(z_hat - lower, upper - z_hat).div_(sigma.clamp(min=1e-30)))[outside].float()
    k = max(1, math.ceil(target_recall * total))
    scale = critical.kthvalue(k).values.item()
    if scale < 0:  # the target is met with no margin at all
        return torch.zeros_like(sigma)
    # Strictly above the k-th critical scale (the comparisons are strict), with room for float
    # rounding in ``lower + margin``: halfway to the next one, at least 1e-4 relative.
    gap = (critical.kthvalue(k + 1).values.item() - scale) / 2 if k < total else 0.0
    return min(scale + max(gap, 1e-4 * abs(scale) + 1e-9), max_scale) * sigma


def predictor_for(w_rows: torch.Tensor, guard: str, config: CalibrationConfig,
                  x: torch.Tensor) -> LowBitGuard | SVDPredictor | None:
    """The predictor a guard flags with, fitted to ``w_rows`` (and, for "svd", to the calibration
    inputs ``x``); None for "exact" and "all".

    Example:
        >>> predictor_for(torch.randn(32, 64), "int8", CalibrationConfig(), torch.randn(100, 64)).kernel
        'int8'
    """
    if guard in LOW_BIT_GUARDS:
        return LowBitGuard.build(w_rows, LOW_BIT_GUARDS[guard], config.group_size)
    if guard == "svd":
        m, d = w_rows.shape
        rank = min(config.svd_rank or max(1, d // 4), m, d)
        return SVDPredictor.build(w_rows, x, rank)
    return None


def guard_prediction(predictor: LowBitGuard | SVDPredictor | None, x: torch.Tensor, bias: torch.Tensor | None,
                     exact: torch.Tensor) -> torch.Tensor:
    """What the guard predicts for the pre-activations whose true values are ``exact``: the
    predictor's output plus the bias, or ``exact`` itself for "exact" and "all" (no predictor).

    Example:
        >>> z = torch.randn(4, 8)
        >>> guard_prediction(None, torch.randn(4, 16), None, z) is z
        True
    """
    if predictor is None:
        return exact
    return predictor.predict(x) + (bias if bias is not None else 0.0)


def guard_margins(guard: str, z: torch.Tensor, z_hat: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                  error_terms: torch.Tensor, col_norm2: torch.Tensor, config: CalibrationConfig,
                  sigma: torch.Tensor | None) -> torch.Tensor:
    """Per-neuron margins of the guard's flag band: for "svd" SVDP's greedy per-neuron thresholds
    (leaving at most 1 - target_recall of the out-of-range error unflagged), for the low-bit guards
    one scale of each neuron's prediction-error std meeting the recall target; none for "exact".

    Example:
        >>> # margin = guard_margins("int8", z, z_hat, lower, upper, terms, norms, config, sigma)
    """
    if sigma is None:
        return torch.zeros(z.shape[1])
    if guard == "svd":
        cost = error_terms * col_norm2.float()
        return greedy_margins(z, z_hat, lower, upper, cost, 1.0 - config.target_recall)
    return recall_margins(z, z_hat, lower, upper, config.target_recall, sigma=sigma)


def packed_predictor(predictor: LowBitGuard | SVDPredictor | None) -> torch.Tensor | None:
    """What the profile stores of an "svd" guard: ``[Q^T | P]``, (r, m + d_in), float32 (the op's
    extra params rows); None for the other guards, which the op rebuilds from the weights."""
    if not isinstance(predictor, SVDPredictor):
        return None
    return torch.cat([predictor.Q.t(), predictor.P], dim=1).float().contiguous()
