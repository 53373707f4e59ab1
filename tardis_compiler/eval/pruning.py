"""Unstructured pruning baselines on FFN weights only: Wanda and RIA, at a bytes-read budget.

Both score every weight, then keep the top-scoring fraction *within each output row* (both papers
compare weights per output), with the fraction solved from the budget under the bitmask format
convention (``tardis_compiler.accounting.density_for_budget``). Both work on a deep copy of the model.

One simplification against the reference code, stated so nobody mistakes it: activation norms
come from one pass of the *dense* model. The Wanda/RIA scripts prune layer by layer and feed each
layer the output of the already-pruned layers before it; that costs one pass per layer here.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch

from ..accounting import bitmask_bytes, density_for_budget
from .accounting import FFNBytes, PreparedModel
from .calibration_stats import ffn_input_stats
from .ffn import find_ffn_linears

#: score(weight [out, in], feature_norm [in]) -> scores [out, in]; larger means keep.
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def wanda_scores(weight: torch.Tensor, feature_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2.

    Example:
        >>> wanda_scores(torch.tensor([[1.0, -2.0]]), torch.tensor([3.0, 1.0]))
        tensor([[3., 2.]])
    """
    return weight.abs().float() * feature_norm.float()[None, :]


def ria_scores(weight: torch.Tensor, feature_norm: torch.Tensor,
               alpha: float = 0.5) -> torch.Tensor:
    """RIA (Zhang et al. 2024), relative importance and activations:
    (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** alpha.

    Example:
        >>> ria_scores(torch.tensor([[1.0, 1.0], [1.0, 3.0]]), torch.ones(2))
        tensor([[1.0000, 0.7500],
                [0.7500, 1.5000]])
    """
    magnitude = weight.abs().float()
    tiny = torch.finfo(torch.float32).tiny  # an all-zero row or column must not divide by zero
    row_share = magnitude / magnitude.sum(dim=1, keepdim=True).clamp_min(tiny)
    column_share = magnitude / magnitude.sum(dim=0, keepdim=True).clamp_min(tiny)
    return (row_share + column_share) * feature_norm.float()[None, :].pow(alpha)


def keep_top_per_row(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask keeping the ``keep`` highest scores of each row.

    Example:
        >>> keep_top_per_row(torch.tensor([[0.1, 0.9, 0.5]]), 2)
        tensor([[False,  True,  True]])
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(1, scores.topk(keep, dim=1).indices, True)
    return mask


def prune_ffn(model: torch.nn.Module, batches: Iterable[Any], budget: float, score: ScoreFn,
              *, method: str, progress: bool = False) -> PreparedModel:
    """Copy ``model`` and zero its FFN weights with the lowest ``score`` per output row, keeping
    the density that reads ``budget`` of the dense FFN bytes in bitmask format.

    Example:
        >>> prepared = prune_ffn(model, batches, 0.5, wanda_scores, method="wanda")
        >>> prepared.ffn_bytes.read_fraction <= 0.5
        True
    """
    stats = ffn_input_stats(model, batches, progress=progress)
    pruned = copy.deepcopy(model)
    dense_total = read_total = kept_total = positions_total = 0
    for ffn in find_ffn_linears(pruned):
        weight = ffn.module.weight
        density = density_for_budget(budget, weight.element_size())
        keep = round(density * weight.shape[1])
        mask = keep_top_per_row(score(weight.detach(), stats[ffn.name].feature_norm), keep)
        with torch.no_grad():
            weight.mul_(mask.to(weight.dtype))
        kept = int(mask.sum())
        dense_total += ffn.weight_bytes
        read_total += bitmask_bytes(kept, weight.numel(), weight.element_size())
        kept_total, positions_total = kept_total + kept, positions_total + weight.numel()
    # Pruned weights are not read at all, so bytes read per token equal bytes resident.
    ffn_bytes = FFNBytes(read_per_token=float(read_total), resident=read_total, dense=dense_total)
    return PreparedModel(pruned, ffn_bytes, details={"method": method, "format": "bitmask",
                                                      "density": kept_total / positions_total})


def wanda(model: torch.nn.Module, batches: Iterable[Any], budget: float) -> PreparedModel:
    """Wanda baseline at ``budget`` (fraction of dense FFN weight bytes read per token).

    Example:
        >>> wanda(model, batches, 0.5).ffn_bytes.read_fraction <= 0.5
        True
    """
    return prune_ffn(model, batches, budget, wanda_scores, method="wanda")


def ria(model: torch.nn.Module, batches: Iterable[Any], budget: float) -> PreparedModel:
    """RIA baseline at ``budget`` (fraction of dense FFN weight bytes read per token).

    Example:
        >>> 0 < ria(model, batches, 0.5).details["density"] < 1
        True
    """
    return prune_ffn(model, batches, budget, ria_scores, method="ria")
