"""Lowering: the fused ``tardis::folded_ffn`` custom op that replaces each calibrated FFN.

    y = Wf x + bf + sum_{i flagged} W2[:, i] * (act(z_i) - a_i z_i - c_i),   z_i = W1[i] . x + b1_i

Corrections are per token: token t uses the exact activation exactly for the neurons flagged for
t, so a token's output never depends on which other tokens share its batch. The op computes z for
the union of flagged neurons and masks each token's correction; when that union is larger than
``dense_above`` of the neurons (long prefills), computing z in full is cheaper, so it runs
``W2 where(flag, act(z), a z + c) + b2`` instead, which is the same function. ``guard="all"``
never takes that shortcut: it exists to check the folded path against the dense model.

The op is opaque to inductor (kept as an extern call) and carries a fake kernel for tracing.
``params`` packs the per-neuron calibration as rows: slope, intercept, lower, upper, and the
guard's lower/upper flag thresholds (see ``PARAM_ROWS``); with the "svd" guard, the predictor's
factors follow as further rows (``fold.split_params``). A per-neuron policy (calibrate_plain.py)
is encoded in the thresholds, as for gated FFNs: an empty band (lower > upper) flags a neuron for
every token (always exact), an unbounded one never (folded unguarded); the low-bit guard holds only
the rows of the neurons it watches, and when every line is zero there is no folded matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import get_activation_rule
from .correction import gather_rows_matmul, scatter_rows_matmul
from .fold import (FOLD_CACHE, FoldedFFN, build_guard, fold_ffn, neuron_major, rows_contiguous, split_params,
                   w2_neuron_major)
from .stats import active_stats

PARAM_ROWS = ("slope", "intercept", "lower", "upper", "guard_lower", "guard_upper")


@torch.library.custom_op("tardis::folded_ffn", mutates_args=())
def folded_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    params: torch.Tensor,
    name: str,
    activation: str,
    w1_layout: str,
    w2_layout: str,
    guard: str,
    group_size: int,
    dense_above: float,
) -> torch.Tensor:
    """Folded FFN with exact correction of guard-flagged neurons; see the module docstring.

    Example:
        >>> import torch
        >>> w1, w2 = torch.randn(16, 4), torch.randn(4, 16)       # nn.Linear layouts
        >>> params = torch.zeros(6, 16); params[0] = 1.0             # line z -> z, never in range
        >>> x = torch.randn(2, 4)
        >>> y = torch.ops.tardis.folded_ffn(x, w1, None, w2, None, params, "demo", "relu",
        ...                                 "out_in", "out_in", "all", 64, 0.5)
        >>> torch.allclose(y, torch.relu(x @ w1.T) @ w2.T, atol=1e-5)
        True
    """
    w1_rows = neuron_major(w1, w1_layout)
    w2_rows = w2_neuron_major(w2, w2_layout)
    m, d_in = w1_rows.shape
    d_out = w2_rows.shape[1]
    x2 = x.reshape(-1, d_in)
    params = params.to(device=x.device, dtype=torch.float32)
    slope, intercept, lower, upper, guard_lower, guard_upper = split_params(params, m)[0].unbind(0)
    folded = _folded(name, w1, b1, w2, b2, w1_rows, w2_rows, slope, intercept, guard, group_size, params)

    if guard == "all":
        idx = torch.arange(m, device=x.device)
    else:
        if guard == "exact":
            z = F.linear(x2, w1_rows, b1).float()
            flags = (z < lower) | (z > upper)
        else:
            flags = _guard_flags(folded, x2, b1, guard_lower, guard_upper)
        idx = flags.any(dim=0).nonzero().squeeze(1)
        if idx.numel() > dense_above * m:
            _record(name, flags, m, dense=True)
            z = F.linear(x2, w1_rows, b1).float()
            hidden = torch.where(flags, get_activation_rule(activation).fn(z), slope * z + intercept)
            return F.linear(hidden.to(x.dtype), w2_rows.t(), b2).reshape(*x.shape[:-1], d_out)

    if folded.weight is not None:
        y = F.linear(x2, folded.weight, folded.bias)
    else:  # contextual sparsity: unflagged neurons contribute nothing
        y = x2.new_zeros(x2.shape[0], d_out) + (b2 if b2 is not None else 0)
    if idx.numel():
        z_k = gather_rows_matmul(x2, folded.w1_rows, idx)
        if b1 is not None:
            z_k = z_k + b1[idx]
        z_k = z_k.float()
        delta = get_activation_rule(activation).fn(z_k) - slope[idx] * z_k - intercept[idx]
        if guard != "all" and x2.shape[0] > 1:
            delta = delta * flags[:, idx]  # per-token: only where this token was flagged
        y = y + scatter_rows_matmul(delta.to(x.dtype), folded.w2_rows, idx)
    _record(name, flags if guard != "all" else None, m, dense=False, corrected=idx.numel(), tokens=x2.shape[0])
    return y.reshape(*x.shape[:-1], d_out)


@folded_ffn.register_fake
def _folded_ffn_fake(x, w1, b1, w2, b2, params, name, activation, w1_layout, w2_layout, guard,
                     group_size, dense_above):
    d_out = w2.shape[0] if w2_layout == "out_in" else w2.shape[1]
    return x.new_empty((*x.shape[:-1], d_out))


def _guard_flags(folded: FoldedFFN, x2: torch.Tensor, b1: torch.Tensor | None, guard_lower: torch.Tensor,
                 guard_upper: torch.Tensor) -> torch.Tensor:
    """(tokens, m) flags of a predicting guard (low-bit or svd): the watched rows by prediction, the rest
    by policy."""
    m = guard_lower.shape[0]
    watched = folded.guarded
    z_hat = folded.guard.predict(x2) if watched.numel() else None
    if z_hat is not None and b1 is not None:
        z_hat = z_hat + b1[watched].float()
    if watched.numel() == m:  # every neuron watched (a coverage-only calibration)
        return (z_hat < guard_lower) | (z_hat > guard_upper)
    flags = (guard_lower > guard_upper).expand(x2.shape[0], m).clone()  # the always-exact neurons
    if z_hat is not None:
        flags[:, watched] = (z_hat < guard_lower[watched]) | (z_hat > guard_upper[watched])
    return flags


def _folded(name, w1, b1, w2, b2, w1_rows, w2_rows, slope, intercept, guard, group_size, params) -> FoldedFFN:
    def build() -> FoldedFFN:
        weight = bias = None
        if bool((slope != 0).any() or (intercept != 0).any()):
            weight, bias = fold_ffn(w1_rows, b1, w2_rows, b2, slope, intercept)
        rows, predictor_rows = split_params(params, w1_rows.shape[0])
        band_lo, band_hi = rows[4], rows[5]
        always = (band_lo > band_hi).nonzero().squeeze(1)
        guarded = ((torch.isfinite(band_lo) | torch.isfinite(band_hi)) & ~(band_lo > band_hi)).nonzero().squeeze(1)
        predictor = build_guard(guard, w1_rows, guarded, group_size, predictor_rows)
        return FoldedFFN(weight, bias, predictor, rows_contiguous(w1_rows), rows_contiguous(w2_rows), always, guarded)

    tensors = {"w1": w1, "w2": w2, "b1": b1, "b2": b2, "params": params}
    return FOLD_CACHE.get(f"{name}|{guard}|{group_size}", tensors, build)


def _record(name: str, flags: torch.Tensor | None, neurons: int, dense: bool, corrected: int | None = None,
            tokens: int | None = None) -> None:
    """Count into the active ``collect_stats`` block, if any (flags None: every neuron flagged)."""
    stats = active_stats()
    if stats is None:
        return
    tokens = flags.shape[0] if flags is not None else tokens
    flagged = int(flags.sum()) if flags is not None else tokens * neurons
    corrected = neurons if dense else corrected
    stats.record(name, tokens, neurons, flagged, corrected, dense)
