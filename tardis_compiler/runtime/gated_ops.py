"""Lowering for gated FFNs: the ``tardis::gated_ffn`` custom op.

    y = Wf x + bf + sum_{i flagged} W_d[:, i] * (act(g_i) - c_i) * u_i,
    Wf = W_d diag(c) W_u,  bf = W_d (c * b_u) + b_d,  g = W_g x + b_g,  u = W_u x + b_u

Each neuron's option (calibrate_gated.py) is encoded in its range: exact neurons have an empty one
(+inf, -inf), so they are flagged for every token; folded and dropped neurons an unbounded one, so
they never are; guarded neurons are flagged when the guard's prediction of g_i leaves
[guard_lower_i, guard_upper_i]. The guard's low-bit copy holds only the guarded gate rows.

As in ``tardis::folded_ffn``, corrections are per token (batch-invariant outputs), a flagged union
above ``dense_above`` of the neurons runs ``W_d (where(flag, act(g), c) * u) + b_d`` (the same
function), and ``guard="all"`` flags everything: it must reproduce the dense FFN. Phi-3-style fused
``gate_up`` weights are passed twice with row offsets, so no slice of them is ever copied.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import get_activation_rule
from .correction import gather_rows_matmul, scatter_rows_matmul
from .fold import FOLD_CACHE, FoldedGatedFFN, build_guard, fold_ffn, rows_contiguous, split_params
from .stats import active_stats



@torch.library.custom_op("tardis::gated_ffn", mutates_args=())
def gated_ffn(
    x: torch.Tensor,
    wg: torch.Tensor,
    bg: torch.Tensor | None,
    wu: torch.Tensor,
    bu: torch.Tensor | None,
    wd: torch.Tensor,
    bd: torch.Tensor | None,
    params: torch.Tensor,
    name: str,
    activation: str,
    gate_offset: int,
    up_offset: int,
    guard: str,
    group_size: int,
    dense_above: float,
) -> torch.Tensor:
    """Gated FFN with a constant-gate fold and exact correction of flagged neurons; see the module
    docstring. Weights are nn.Linear layouts: wg, wu (rows >= m, d_in), wd (d_out, m).

    Example:
        >>> import torch
        >>> wg, wu, wd = torch.randn(16, 4), torch.randn(16, 4), torch.randn(4, 16)
        >>> params = torch.zeros(6, 16)                  # c = 0, empty guard bands
        >>> x = torch.randn(3, 4)
        >>> y = torch.ops.tardis.gated_ffn(x, wg, None, wu, None, wd, None, params, "demo", "silu",
        ...                                0, 0, "all", 64, 0.5)
        >>> dense = (torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)) @ wd.T
        >>> torch.allclose(y, dense, atol=1e-5)
        True
    """
    m = wd.shape[1]
    wg_rows, wu_rows = wg.narrow(0, gate_offset, m), wu.narrow(0, up_offset, m)
    bg_m = bg.narrow(0, gate_offset, m) if bg is not None else None
    bu_m = bu.narrow(0, up_offset, m) if bu is not None else None
    d_in, d_out = wg_rows.shape[1], wd.shape[0]
    x2 = x.reshape(-1, d_in)
    tokens = x2.shape[0]
    params = params.to(device=x.device, dtype=torch.float32)
    _, constant, lower, upper, guard_lower, guard_upper = split_params(params, m)[0].unbind(0)
    act = get_activation_rule(activation).fn
    folded = _folded(name, wg, bg, wu, bu, wd, bd, wg_rows, wu_rows, bu_m, constant, params, guard, group_size)

    g_full = None
    if guard == "all":
        idx, mask, flags = torch.arange(m, device=x.device), None, None
    elif guard == "exact":
        g_full = F.linear(x2, wg_rows, bg_m)
        flags = (g_full.float() < lower) | (g_full.float() > upper)
        idx = flags.any(dim=0).nonzero().squeeze(1)
        mask = flags[:, idx]
    else:
        g_hat = folded.guard.predict(x2) if folded.guarded.numel() else x2.new_zeros(tokens, 0).float()
        if bg_m is not None:
            g_hat = g_hat + bg_m[folded.guarded].float()
        band_lo, band_hi = guard_lower[folded.guarded], guard_upper[folded.guarded]
        sub = (g_hat < band_lo) | (g_hat > band_hi)
        hit = sub.any(dim=0)
        if folded.always.numel() + int(hit.sum()) > dense_above * m:  # long prefills: no gathers
            flags = (lower > upper).expand(tokens, m).clone()  # the always-exact neurons
            flags[:, folded.guarded] = sub
            idx, mask = None, None
        else:
            idx = torch.cat([folded.always, folded.guarded[hit]])
            mask = torch.cat([sub.new_ones(tokens, folded.always.numel()), sub[:, hit]], dim=1)
    if guard != "all" and (idx is None or idx.numel() > dense_above * m):
        _record(name, tokens, m, int(flags.sum()), m, dense=True)
        g = g_full if g_full is not None else F.linear(x2, wg_rows, bg_m)
        u = F.linear(x2, wu_rows, bu_m)
        hidden = torch.where(flags, act(g.float()), constant).mul_(u)
        return F.linear(hidden.to(x.dtype), wd, bd).reshape(*x.shape[:-1], d_out)

    if folded.weight is not None:
        y = F.linear(x2, folded.weight, folded.bias)
    else:
        y = x2.new_zeros(tokens, d_out) + (bd if bd is not None else 0)
    if idx.numel():
        g_k = g_full[:, idx] if g_full is not None else _gather(x2, wg_rows, bg_m, idx)
        u_k = _gather(x2, wu_rows, bu_m, idx)
        delta = (act(g_k.float()) - constant[idx]) * u_k.float()
        if mask is not None and tokens > 1:
            delta = delta * mask  # per token: only where this token was flagged
        y = y + scatter_rows_matmul(delta.to(x.dtype), folded.wd_rows, idx)
    flagged = tokens * m if mask is None else int(mask.sum())
    _record(name, tokens, m, flagged, idx.numel(), dense=False)
    return y.reshape(*x.shape[:-1], d_out)


@gated_ffn.register_fake
def _gated_ffn_fake(x, wg, bg, wu, bu, wd, bd, params, name, activation, gate_offset, up_offset, guard,
                    group_size, dense_above):
    return x.new_empty((*x.shape[:-1], wd.shape[0]))


def _gather(x2: torch.Tensor, rows: torch.Tensor, bias: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
    out = gather_rows_matmul(x2, rows, idx)
    return out + bias[idx] if bias is not None else out


def _folded(name, wg, bg, wu, bu, wd, bd, wg_rows, wu_rows, bu_m, constant, params, guard, group_size):
    def build() -> FoldedGatedFFN:
        rows, predictor_rows = split_params(params, wg_rows.shape[0])
        _, _, lower, upper, band_lo, band_hi = rows.unbind(0)
        always = (lower > upper).nonzero().squeeze(1)
        watched = (torch.isfinite(band_lo) | torch.isfinite(band_hi)) & ~(lower > upper)
        guarded = watched.nonzero().squeeze(1)
        weight = bias = None
        if bool((constant != 0).any()):
            # W_d (c * (W_u x + b_u)) + b_d is fold_ffn's W2 (a * (W1 x + b1) + 0) + b2 with a = c.
            weight, bias = fold_ffn(wu_rows, bu_m, wd.t(), bd, constant, torch.zeros_like(constant))
        predictor = build_guard(guard, wg_rows, guarded, group_size, predictor_rows)
        return FoldedGatedFFN(weight, bias, always, guarded, predictor, rows_contiguous(wd.t()))

    tensors = {"wg": wg, "wu": wu, "wd": wd, "bg": bg, "bu": bu, "bd": bd, "params": params}
    return FOLD_CACHE.get(f"{name}|gated|{guard}|{group_size}", tensors, build)


def _record(name: str, tokens: int, neurons: int, flagged: int, corrected: int, dense: bool) -> None:
    stats = active_stats()
    if stats is not None:
        stats.record(name, tokens, neurons, flagged, corrected, dense)
