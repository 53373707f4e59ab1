"""Plain candidates: each neuron's options in a plain FFN ``y = W2 act(W1 x + b1) + b2`` under a
bytes budget: the same options and knapsack as gated FFNs (``gated.py``, ``policy.py``), with lines
instead of constants.

Per neuron i, on the recorded FFN inputs (z = W1[i] . x + b1_i, error weight ``||W2[:, i]||^2``):

- ``guarded@p``: the window of a share p of the z-sorted tokens on which the least-squares line
  ``a_i z + c_i`` fits act(z) best (least squared error, from prefix sums in O(1) per window), the
  guard's margins (``margins.guard_margins``), and the error and flag rate that guard really gives;
- ``folded``: the least-squares line over all tokens, never flagged;
- ``exact`` (heavy hitters): always computed; no error, the full row and column read per token.

Without a folded matrix (the second variant: contextual sparsity) lines are zero: ``dropped``
neurons contribute nothing and guarded windows are where act(z) is nearest zero. Used whenever a
budget is given (``calibrate_for_budget``, ``options={"budget": ...}``); without one, plain FFNs keep
the coverage calibration of ``coverage.fit_ffn``, whose ranges carry a worst-case error bound.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..accounting import (always_read_bytes, exact_neuron_bytes, ffn_bytes_per_token, folded_matrix_bytes, guard_bytes,
                          held_bytes)
from ..activations import get_activation_rule
from ..config import PREDICTOR_GUARDS, CalibrationConfig
from ..profile import FFNProfile
from .lstsq_fold import fit_fold_term, fold_term_output
from .margins import guard_margins, guard_prediction, packed_predictor, predictor_for
from .policy import COVERAGES, Choice, NeuronOptions, encode_choice, policy_measurements
from .ranges import max_line_error, prefix_sums, split_tokens

if TYPE_CHECKING:  # the recorder's module imports the fitting steps
    from .record import FFNRecord

_INF = math.inf


@dataclasses.dataclass
class PlainCandidates:
    """One plain FFN's options, computed once (the plain counterpart of ``GatedCandidates``)."""

    record: FFNRecord
    weights: dict[str, torch.Tensor | None]  # float32 CPU copies
    variants: list[tuple[bool, NeuronOptions, dict, float]]  # (with_fold, options, plan, fixed bytes)
    dense_bytes: float
    energy: float  # mean squared norm of the dense FFN output on the fit tokens
    stats: dict[str, Any]
    x_eval: torch.Tensor
    measure: dict[str, Any]

    def budget_bytes(self, budget: float) -> float:
        """Bytes per token the neuron mix and the fixed parts may spend."""
        return budget * self.dense_bytes


def prepare_plain_ffn(record: FFNRecord, config: CalibrationConfig, guard: str) -> PlainCandidates:
    """Every option of every neuron of one plain FFN, with its error and bytes (module docstring)."""
    w = record.float_weights(config.weights)  # the reference: the quantized weights' values for a quantized pack
    quant = config.weights or "dense"
    act = get_activation_rule(record.activation).fn
    m, d_in = w["w1_rows"].shape
    d_out = w["w2_rows"].shape[1]
    elem = record.weights["w1_rows"].element_size()
    has_bias = w["b1"] is not None or w["b2"] is not None
    dense_bytes = ffn_bytes_per_token(d_in, m, d_out, elem, has_bias, weights=quant)

    x_fit, x_hold, measured_on = split_tokens(record.tokens(), config)
    z = F.linear(x_fit, w["w1_rows"], w["b1"])
    y = act(z)
    col_norm2 = w["w2_rows"].double().pow(2).sum(1)
    predictor = predictor_for(w["w1_rows"], guard, config, x_fit)
    z_hat = guard_prediction(predictor, x_fit, w["b1"], z)
    energy = (y @ w["w2_rows"]).pow(2).sum(1).mean().item()

    # As the pack lays them out (runtime/layout.py): a bundle [W1 row | W2 column] and four floats.
    exact_cost = float(exact_neuron_bytes("plain", d_in, d_out, elem, quant))
    guarded_rows = config.bundles if quant == "dense" else quant  # quantized weights: every bundle in their encoding
    guarded_cost = float(exact_neuron_bytes("plain", d_in, d_out, elem, guarded_rows))  # a flagged guarded neuron
    guard_row, guard_fixed = guard_bytes(predictor, d_in, elem, quant)
    fold_bytes = float(folded_matrix_bytes(d_in, d_out, elem, quant))
    order = z.argsort(dim=0)
    z_sorted, y_sorted = z.gather(0, order), y.gather(0, order)
    zd, yd = z_sorted.double(), y_sorted.double()
    prefix = {"z": prefix_sums(zd), "zz": prefix_sums(zd * zd), "y": prefix_sums(yd),
              "zy": prefix_sums(zd * yd), "yy": prefix_sums(yd * yd)}
    sigma = (z_hat - z).std(dim=0) if predictor is not None else None
    variants = []
    for with_fold in (True, False):
        held = held_bytes(predictor, "plain", d_in, d_out, elem, config.bundles, with_fold, quant)
        opts, plan = _options(z, y, z_hat, z_sorted, prefix, sigma, col_norm2, with_fold, (exact_cost, guarded_cost),
                              guard_row, guard, config, held)
        fixed = (fold_bytes if with_fold else 0.0) + always_read_bytes(d_out, quant) + guard_fixed
        variants.append((with_fold, opts, plan, fixed))
    stats = {"tokens_fit": x_fit.shape[0], "tokens_holdout": x_hold.shape[0], "measured_on": measured_on,
             "elem_bytes": elem, "has_bias": has_bias, "dense_bytes": dense_bytes, "bundles": config.bundles,
             "weights": quant}
    measure = {"act": act, "predictor": predictor, "guard": guard, "guard_row": guard_row, "guard_fixed": guard_fixed,
               "costs_of": (exact_cost, guarded_cost), "x_fit": x_fit, "lstsq": config.fold_fit == "lstsq", "seed": config.seed}
    return PlainCandidates(record, w, variants, dense_bytes, energy, stats, x_hold if x_hold.shape[0] else x_fit,
                           measure)


def finish_plain_ffn(cand: PlainCandidates, variant: int, choice: Choice, budget: float) -> FFNProfile:
    """Encode the chosen options as the op's per-neuron params and measure them on held-out tokens."""
    with_fold, opts, plan, fixed = cand.variants[variant]
    w, k = cand.weights, cand.measure
    m = w["w1_rows"].shape[0]
    p = encode_choice(opts, plan, choice, m, values=("slope", "intercept"))
    p["fold_term"] = None
    if with_fold and k["lstsq"]:
        error, *_ = _output_error(cand, k["x_fit"], p, k["guard"])
        p["fold_term"] = fit_fold_term(k["x_fit"], -error, k["seed"])
    guarded = torch.isfinite(p["lower"]) & (p["lower"] <= p["upper"])
    line_error = torch.zeros(m)
    if guarded.any():
        line_error[guarded] = max_line_error(k["act"], p["slope"][guarded], p["intercept"][guarded],
                                             p["lower"][guarded], p["upper"][guarded])
    unguarded = torch.isinf(p["lower"]) & (p["lower"] < p["upper"])
    line_error[unguarded] = _INF
    stats = dict(cand.stats, budget=budget,
                 policy={"counts": choice.counts(opts.labels), "folded_matrix": with_fold,
                         "within_budget": choice.within_budget,
                         "calibration_bytes_fraction": choice.bytes / cand.dense_bytes,
                         "calibration_rel_error": (opts.error.gather(1, choice.option[:, None]).sum().item()
                                                   / max(cand.energy, 1e-30)) ** 0.5})
    # |dy|_inf <= sum_i |W2[:, i]| line_error_i when the guard misses nothing; none if a neuron is unguarded.
    stats["error_bound"] = None if bool(unguarded.any()) else \
        (w["w2_rows"].abs() * line_error[:, None]).sum(0).max().item()
    stats.update(_measure(cand, p, fixed))
    rec, guard = cand.record, k["guard"]
    return FFNProfile(
        name=rec.name, pattern=rec.pattern, activation=rec.activation, d_in=w["w1_rows"].shape[1], d_hidden=m,
        d_out=w["w2_rows"].shape[1], slope=p["slope"], intercept=p["intercept"], lower=p["lower"],
        upper=p["upper"], line_error=line_error,
        margins={guard: p["margin"]} if guard in PREDICTOR_GUARDS else {}, stats=stats,
        predictor=packed_predictor(k["predictor"]), fold_term=p["fold_term"],
    )


def _options(z, y, z_hat, z_sorted, prefix, sigma, col_norm2, with_fold: bool, costs_of: tuple[float, float],
             guard_row: float, guard: str, config: CalibrationConfig,
             held: tuple[float, float, float]) -> tuple[NeuronOptions, dict]:
    """Per-neuron error and cost of each option, and the ranges/lines/margins behind them.
    ``costs_of``: bytes an exact neuron reads, and a flagged guarded one (int8 bundles: fewer);
    ``held``: bytes the pack holds per exact neuron, per guarded one, and whatever the mix."""
    exact_cost, guarded_cost = costs_of
    n, m = z.shape
    labels, errors, costs = ["exact"], [torch.zeros(m, dtype=torch.float64)], [torch.full((m,), exact_cost)]
    # Held in memory: exact and guarded neurons keep their bundle (guarded ones their guard row too),
    # as the pack holds them (accounting.held_bytes: padding, floats, ``neurons`` entry).
    held_exact, held_guarded, held_fixed = held
    resident = [torch.full((m,), held_exact, dtype=torch.float64)]
    plan: dict[str, dict[str, torch.Tensor]] = {}

    total = {key: p[-1:] for key, p in prefix.items()}
    labels.append("folded" if with_fold else "dropped")
    slope, intercept, sse = _window_lines(total, n, with_fold)
    errors.append(col_norm2 * sse[0] / n)
    plan[labels[-1]] = {"slope": slope[0].float(), "intercept": intercept[0].float()}
    costs.append(torch.zeros(m, dtype=torch.float64))
    resident.append(torch.zeros(m, dtype=torch.float64))

    cols = torch.arange(m)
    for p in COVERAGES:
        k = max(1, min(n, math.ceil(p * n)))
        window = {key: v[k:] - v[: n - k + 1] for key, v in prefix.items()}
        slopes, intercepts, sse = _window_lines(window, k, with_fold)
        start = sse.argmin(dim=0)
        lower, upper = z_sorted[start, cols].clone(), z_sorted[start + k - 1, cols].clone()
        a, c = slopes[start, cols].float(), intercepts[start, cols].float()
        error_terms = (y - (a * z + c)).square_()
        margin = guard_margins(guard, z, z_hat, lower, upper, error_terms, col_norm2, config, sigma)
        flags = (z_hat < lower + margin) | (z_hat > upper - margin)
        kept = error_terms.masked_fill_(flags, 0.0)
        errors.append(col_norm2 * kept.sum(0).double() / n)
        costs.append(guard_row + flags.sum(0).double() / n * guarded_cost)
        resident.append(torch.full((m,), held_guarded, dtype=torch.float64))
        labels.append(f"guarded@{p}")
        plan[labels[-1]] = {"slope": a, "intercept": c, "lower": lower, "upper": upper, "margin": margin}
    return NeuronOptions(labels, torch.stack(errors, 1), torch.stack(costs, 1), torch.stack(resident, 1),
                         held_fixed), plan


def _window_lines(s: dict[str, torch.Tensor], k: int, with_fold: bool):
    """Least-squares line of y on z over windows of k tokens from their sums: (slope, intercept,
    squared error), each (windows, m) float64. Without a fold the line is zero."""
    if not with_fold:
        zero = torch.zeros_like(s["yy"])
        return zero, zero, s["yy"].clamp(min=0)
    var_z = s["zz"] - s["z"] * s["z"] / k
    cov = s["zy"] - s["z"] * s["y"] / k
    flat = var_z <= 1e-12 * s["zz"].abs().clamp(min=1e-30)  # all z equal: a constant, no slope
    slope = torch.where(flat, 0.0, cov / var_z.clamp(min=1e-30))
    intercept = (s["y"] - slope * s["z"]) / k
    sse = s["yy"] - s["y"] * s["y"] / k - torch.where(flat, 0.0, cov * slope)
    return slope, intercept, sse.clamp(min=0)


def _measure(cand: PlainCandidates, p: dict[str, torch.Tensor], fixed: float) -> dict[str, Any]:
    """What the chosen policy does on held-out tokens: coverage, flags, recall, output error, bytes."""
    k, x = cand.measure, cand.x_eval
    predictor, guard = k["predictor"], k["guard"]
    error, dense_y, flags, outside, always, guarded = _output_error(cand, x, p, guard)
    fold_term = None if guard == "all" else p["fold_term"]  # the pack leaves it out with guard="all"
    delta_y = error + fold_term_output(fold_term, x)
    # ``fixed`` counted the svd guard's P already; policy_measurements adds it back if any neuron is guarded.
    return policy_measurements(flags, outside, always, guarded, delta_y, dense_y, predictor, guard,
                               (k["guard_row"], k["guard_fixed"]), fixed - k["guard_fixed"], k["costs_of"],
                               cand.dense_bytes)


def _output_error(cand: PlainCandidates, x: torch.Tensor, p: dict[str, torch.Tensor], guard: str):
    """(op output - dense output) on tokens ``x`` without a least-squares term, the dense output,
    and the masks behind them: flags, out of range, always exact, guarded."""
    w, k = cand.weights, cand.measure
    z = F.linear(x, w["w1_rows"], w["b1"])
    y = k["act"](z)
    always = p["lower"] > p["upper"]
    guarded = torch.isfinite(p["lower"]) & ~always
    outside = (z < p["lower"]) | (z > p["upper"])
    z_hat = guard_prediction(k["predictor"], x, w["b1"], z)
    flags = (z_hat < p["lower"] + p["margin"]) | (z_hat > p["upper"] - p["margin"]) | always
    if guard == "all":
        flags = torch.ones_like(flags)
    line = p["slope"] * z + p["intercept"]
    error = torch.where(flags, 0.0, line - y) @ w["w2_rows"]
    return error, F.linear(y, w["w2_rows"].t(), w["b2"]), flags, outside, always, guarded
