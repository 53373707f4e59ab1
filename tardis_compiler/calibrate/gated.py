"""Gated candidates: each neuron's options in a gated FFN, priced for the per-neuron policy.

A gated FFN is ``y = W_d (act(W_g x + b_g) * (W_u x + b_u)) + b_d``; its neurons fold on
constant-gate ranges under a bytes budget (DESIGN sections 1.3-1.4). A linear gate does not fold,
a constant one does: where act(g_i) ~= c_i, neuron i contributes ``c_i W_d[:, i] (W_u[i] . x + b_u_i)``,
so all such neurons fold into ``W_d diag(c) W_u`` (d x d). Per neuron, on the recorded FFN inputs:

- error weights: neuron i's output error on a token is ``(act(g_i) - c_i) u_i W_d[:, i]``, whose
  squared norm is ``((act(g_i) - c_i) u_i)^2 ||W_d[:, i]||^2``;
- ``guarded@p`` options: the interval of g holding a share p of the tokens on which that error is
  smallest (a window over the tokens sorted by g, with c_i the u^2-weighted mean of act(g_i) in it:
  the least-squares constant), the guard's margins (``guard_margins``: one recall scale for the
  low-bit copies, SVDP's greedy per-neuron thresholds for "svd"), and the error and flag rate that
  guard actually gives on the fitting tokens;
- ``folded``: c_i over all tokens, never flagged; ``exact``: always computed.

``policy.choose`` then picks the mix that fits the budget with the least error, once with the
folded matrix (its d x d bytes are a fixed cost) and once without it (constants forced to zero:
contextual sparsity), and keeps the better (``allocate.py``). Held-out calibration tokens measure
the result (``finish_gated_ffn``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..accounting import (always_read_bytes, exact_neuron_bytes, folded_matrix_bytes, gated_dense_bytes, guard_bytes,
                          held_bytes)
from ..activations import get_activation_rule
from ..config import PREDICTOR_GUARDS, CalibrationConfig
from ..profile import FFNProfile
from .lstsq_fold import fit_fold_term, fold_term_output
from .margins import guard_margins, guard_prediction, packed_predictor, predictor_for
from .policy import COVERAGES, Choice, NeuronOptions, encode_choice, policy_measurements
from .ranges import prefix_sums, split_tokens

if TYPE_CHECKING:  # the recorder's module imports the fitting steps
    from .record import FFNRecord


@dataclasses.dataclass
class GatedCandidates:
    """One gated FFN's options, computed once: per variant (with / without the folded matrix) the
    per-neuron ``NeuronOptions`` and the ranges behind them, plus what finishing the fit needs."""

    record: FFNRecord
    weights: dict[str, torch.Tensor | None]  # float32 CPU copies
    variants: list[tuple[bool, NeuronOptions, dict, float]]  # (with_fold, options, plan, fixed bytes)
    dense_bytes: int
    energy: float  # mean squared norm of the dense FFN output on the fit tokens (error scale)
    stats: dict[str, Any]
    x_eval: torch.Tensor
    measure: dict[str, Any]

    def budget_bytes(self, budget: float) -> float:
        """Bytes per token the neuron mix may spend (the folded bias is read either way)."""
        return budget * self.dense_bytes - self.measure["always_bytes"]


def prepare_gated_ffn(record: FFNRecord, config: CalibrationConfig, guard: str) -> GatedCandidates:
    """Every option of every neuron of one gated FFN, with its error and bytes (module docstring)."""
    w = record.float_weights(config.weights)  # the reference: the quantized weights' values for a quantized pack
    quant = config.weights or "dense"
    act = get_activation_rule(record.activation).fn
    m, d_in = w["wg_rows"].shape
    d_out = w["wd_rows"].shape[1]
    elem = record.weights["wg_rows"].element_size()
    gate_up_bias = w["bg"] is not None or w["bu"] is not None
    down_bias = w["bd"] is not None
    dense_bytes = gated_dense_bytes(d_in, m, d_out, elem, gate_up_bias, down_bias, quant)

    x_fit, x_hold, measured_on = split_tokens(record.tokens(), config)
    g, u = F.linear(x_fit, w["wg_rows"], w["bg"]), F.linear(x_fit, w["wu_rows"], w["bu"])
    a = act(g)
    col_norm2 = w["wd_rows"].double().pow(2).sum(1)  # ||W_d[:, i]||^2
    predictor = predictor_for(w["wg_rows"], guard, config, x_fit)
    g_hat = guard_prediction(predictor, x_fit, w["bg"], g)
    energy = ((a * u) @ w["wd_rows"]).pow(2).sum(1).mean().item()

    exact_cost = float(exact_neuron_bytes("gated", d_in, d_out, elem, quant))
    guarded_rows = config.bundles if quant == "dense" else quant  # quantized weights: every bundle in their encoding
    guarded_cost = float(exact_neuron_bytes("gated", d_in, d_out, elem, guarded_rows))  # a flagged guarded neuron
    guard_row, guard_fixed = guard_bytes(predictor, d_in, elem, quant)
    fold_bytes = float(folded_matrix_bytes(d_in, d_out, elem, quant))
    sorted_stats = _sorted_stats(g, u, a)
    variants = []
    for with_fold in (True, False):
        held = held_bytes(predictor, "gated", d_in, d_out, elem, config.bundles, with_fold, quant)
        opts, plan = _options(g, u, a, g_hat, sorted_stats, col_norm2, with_fold, (exact_cost, guarded_cost),
                              guard_row, guard, config, held)
        variants.append((with_fold, opts, plan, (fold_bytes if with_fold else 0.0) + guard_fixed))
    stats = {"tokens_fit": x_fit.shape[0], "tokens_holdout": x_hold.shape[0], "measured_on": measured_on,
             "elem_bytes": elem, "has_bias": gate_up_bias or down_bias, "gate_up_bias": gate_up_bias,
             "down_bias": down_bias, "dense_bytes": dense_bytes, "bundles": config.bundles, "weights": quant,
             "error_bound": None}  # u is unbounded: no worst-case bound for a gated FFN
    measure = {"act": act, "predictor": predictor, "guard": guard, "fold_bytes": fold_bytes,
               "guard_row": guard_row, "guard_fixed": guard_fixed, "costs_of": (exact_cost, guarded_cost),
               "always_bytes": always_read_bytes(d_out, quant), "x_fit": x_fit,
               "lstsq": config.fold_fit == "lstsq", "seed": config.seed}
    return GatedCandidates(record, w, variants, dense_bytes, energy, stats, x_hold if x_hold.shape[0] else x_fit,
                           measure)


def finish_gated_ffn(cand: GatedCandidates, variant: int, choice: Choice, budget: float) -> FFNProfile:
    """Encode the chosen options as the op's per-neuron params and measure them on held-out tokens."""
    with_fold, opts, plan, _ = cand.variants[variant]
    m = cand.weights["wg_rows"].shape[0]
    params = encode_choice(opts, plan, choice, m)
    params["line_error"] = torch.zeros(m)
    k = cand.measure
    fold_term = None
    if with_fold and k["lstsq"]:
        error, *_ = _output_error(k["x_fit"], cand.weights, k["act"], params, k["predictor"], k["guard"])
        fold_term = fit_fold_term(k["x_fit"], -error, k["seed"])
    stats = dict(cand.stats, budget=budget,
                 policy={"counts": choice.counts(opts.labels), "folded_matrix": with_fold,
                         "within_budget": choice.within_budget, "calibration_bytes_fraction": choice.bytes /
                         cand.dense_bytes, "calibration_rel_error": (opts.error.gather(1, choice.option[:, None])
                                                                      .sum().item() / max(cand.energy, 1e-30)) ** 0.5})
    stats.update(_measure(cand.x_eval, cand.weights, k["act"], params, k["predictor"], k["guard"], with_fold,
                          k["fold_bytes"], (k["guard_row"], k["guard_fixed"]), k["costs_of"], cand.dense_bytes,
                          k["always_bytes"], fold_term))
    rec, guard = cand.record, k["guard"]
    return FFNProfile(
        name=rec.name, pattern=rec.pattern, activation=rec.activation, d_in=cand.weights["wg_rows"].shape[1],
        d_hidden=m, d_out=cand.weights["wd_rows"].shape[1], slope=torch.zeros(m), intercept=params["c"],
        lower=params["lower"], upper=params["upper"], line_error=params["line_error"],
        margins={guard: params["margin"]} if guard in PREDICTOR_GUARDS else {}, stats=stats, kind="gated",
        predictor=packed_predictor(k["predictor"]), fold_term=fold_term,
    )


def _sorted_stats(g: torch.Tensor, u: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """g sorted per neuron, and prefix sums (float64) of u^2, a u^2 and a^2 u^2 in that order:
    every window's least-squares constant and error in O(1)."""
    order = g.argsort(dim=0)
    a_sorted, u2_sorted = a.gather(0, order).double(), u.gather(0, order).double().pow(2)
    prefix = {"uu": prefix_sums(u2_sorted), "auu": prefix_sums(a_sorted * u2_sorted),
              "aauu": prefix_sums(a_sorted * a_sorted * u2_sorted)}
    return g.gather(0, order), prefix


def _options(g, u, a, g_hat, sorted_stats, col_norm2, with_fold: bool, costs_of: tuple[float, float],
             guard_row: float, guard: str, config: CalibrationConfig,
             held: tuple[float, float, float]) -> tuple[NeuronOptions, dict]:
    """Per-neuron error and cost of each option, and the ranges/constants/margins behind them.
    ``costs_of``: bytes an exact neuron reads, and a flagged guarded one (int8 bundles: fewer);
    ``held``: bytes the pack holds per exact neuron, per guarded one, and whatever the mix."""
    exact_cost, guarded_cost = costs_of
    n, m = g.shape
    u2 = u.pow(2)
    labels, errors, costs = ["exact"], [torch.zeros(m, dtype=torch.float64)], [torch.full((m,), exact_cost)]
    # Held in memory: exact and guarded neurons keep their bundle (guarded ones their guard row too),
    # as the pack holds them (accounting.held_bytes: padding, floats, ``neurons`` entry).
    held_exact, held_guarded, held_fixed = held
    resident = [torch.full((m,), held_exact, dtype=torch.float64)]
    plan: dict[str, dict[str, torch.Tensor]] = {}

    g_sorted, prefix = sorted_stats
    sigma = (g_hat - g).std(dim=0) if g_hat is not g else None
    labels.append("folded" if with_fold else "dropped")
    c_all = _weighted_constant(prefix, with_fold)
    errors.append(col_norm2 * _window_sse(prefix["uu"][-1], prefix["auu"][-1], prefix["aauu"][-1], c_all) / n)
    plan[labels[-1]] = {"c": c_all.float()}
    costs.append(torch.zeros(m, dtype=torch.float64))
    resident.append(torch.zeros(m, dtype=torch.float64))

    for p in COVERAGES:
        lower, upper, c = _best_window(g_sorted, prefix, p, with_fold)
        error_terms = (a - c).square_().mul_(u2)
        margin = guard_margins(guard, g, g_hat, lower, upper, error_terms, col_norm2, config, sigma)
        flags = (g_hat < lower + margin) | (g_hat > upper - margin)
        kept = error_terms.masked_fill_(flags, 0.0)
        errors.append(col_norm2 * kept.sum(0).double() / n)  # float32 pairwise sums: ample here
        costs.append(guard_row + flags.sum(0).double() / n * guarded_cost)
        resident.append(torch.full((m,), held_guarded, dtype=torch.float64))
        labels.append(f"guarded@{p}")
        plan[labels[-1]] = {"c": c, "lower": lower, "upper": upper, "margin": margin}
    return NeuronOptions(labels, torch.stack(errors, 1), torch.stack(costs, 1), torch.stack(resident, 1),
                         held_fixed), plan


def _weighted_constant(prefix: dict, with_fold: bool) -> torch.Tensor:
    """Least-squares constant for act(g) * u ~= c * u over all tokens: the u^2-weighted mean of
    act(g) (0 without a fold)."""
    if not with_fold:
        return torch.zeros(prefix["uu"].shape[1], dtype=torch.float64)
    return prefix["auu"][-1] / prefix["uu"][-1].clamp(min=1e-30)


def _window_sse(uu, auu, aauu, c):
    """sum (a - c)^2 u^2 from the window's sums of u^2, a u^2 and a^2 u^2."""
    return (aauu - 2 * c * auu + c * c * uu).clamp(min=0)


def _best_window(g_sorted, prefix, coverage: float, with_fold: bool):
    """Per neuron, the window of ``coverage`` of the g-sorted tokens with the least squared error
    of act(g) u ~= c u (c the window's least-squares constant, or 0 without a fold)."""
    n, m = g_sorted.shape
    k = max(1, min(n, math.ceil(coverage * n)))
    keys = ("uu", "auu", "aauu") if with_fold else ("aauu",)  # c = 0 needs only sum a^2 u^2
    window = {key: prefix[key][k:] - prefix[key][: n - k + 1] for key in keys}
    if with_fold:
        sse = window["aauu"].sub_(window["auu"].square() / window["uu"].clamp(min=1e-30))
    else:
        sse = window["aauu"]
    start = sse.clamp_(min=0).argmin(dim=0)
    cols = torch.arange(m)
    lower, upper = g_sorted[start, cols].clone(), g_sorted[start + k - 1, cols].clone()
    if with_fold:
        c = (window["auu"][start, cols] / window["uu"][start, cols].clamp(min=1e-30)).float()
    else:
        c = torch.zeros(m)
    return lower, upper, c


def _measure(x, w, act, params, predictor, guard, with_fold, fold_bytes, guard_cost, costs_of, dense_bytes,
             always_bytes, fold_term) -> dict[str, Any]:
    """What the chosen policy does on ``x`` (held-out tokens): coverage, flags, recall, output
    error and bytes read per token."""
    if guard == "all":
        fold_term = None  # the pack leaves the term out: every neuron is exact
    error, dense_y, flags, outside, always, guarded = _output_error(x, w, act, params, predictor, guard)
    delta_y = error + fold_term_output(fold_term, x)
    fixed = (fold_bytes if with_fold else 0.0) + always_bytes
    return policy_measurements(flags, outside, always, guarded, delta_y, dense_y,
                               predictor, guard, guard_cost, fixed, costs_of, dense_bytes)


def _output_error(x, w, act, params, predictor, guard):
    """(op output - dense output) on tokens ``x`` without a least-squares term, the dense output,
    and the masks behind them: flags, out of range, always exact, guarded."""
    g, u = F.linear(x, w["wg_rows"], w["bg"]), F.linear(x, w["wu_rows"], w["bu"])
    a = act(g)
    c, lower, upper, margin = params["c"], params["lower"], params["upper"], params["margin"]
    always = lower > upper
    guarded = torch.isfinite(lower) | torch.isfinite(upper)
    guarded &= ~always
    outside = ((g < lower) | (g > upper))
    g_hat = guard_prediction(predictor, x, w["bg"], g)
    flags = (g_hat < lower + margin) | (g_hat > upper - margin)
    flags |= always
    if guard == "all":
        flags = torch.ones_like(flags)
    delta_h = torch.where(flags, torch.zeros_like(a), (c - a) * u)
    return delta_h @ w["wd_rows"], (a * u) @ w["wd_rows"], flags, outside, always, guarded
