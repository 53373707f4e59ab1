"""Calibrate gated FFNs ``y = W_d (act(W_g x + b_g) * (W_u x + b_u)) + b_d``: constant-gate ranges
and the per-neuron policy under a bytes budget (DESIGN sections 1.3-1.4).

A linear gate does not fold, a constant one does: where act(g_i) ~= c_i, neuron i contributes
``c_i W_d[:, i] (W_u[i] . x + b_u_i)``, so all such neurons fold into ``W_d diag(c) W_u`` (d x d).
Per neuron, on the recorded FFN inputs:

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
contextual sparsity), and keeps the better. Held-out calibration tokens measure the result.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from .activations import get_activation_rule
from .calibrate import FFNRecord, recall_margins, split_tokens
from .config import LOW_BIT_GUARDS, PREDICTOR_GUARDS, CalibrationConfig
from .policy import Choice, NeuronOptions, choose, choose_across
from .profile import FFNProfile
from .runtime.guard import LowBitGuard
from .runtime.layout import always_read_bytes, exact_neuron_bytes, folded_matrix_bytes, guard_neuron_bytes
from .runtime.svd_predictor import SVDPredictor, greedy_margins
from .lstsq_fold import NeuronRegressions

#: Range coverages offered to each guarded neuron.
COVERAGES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
_INF = math.inf


def gated_dense_bytes(d_in: int, m: int, d_out: int, elem_bytes: int, gate_up_bias: bool, down_bias: bool) -> int:
    """Weight bytes a dense gated FFN reads per token.

    Example:
        >>> gated_dense_bytes(576, 1536, 576, 4, False, False)   # SmolLM2-135M, fp32
        10616832
    """
    return (2 * m * d_in + m * d_out + 2 * m * gate_up_bias + d_out * down_bias) * elem_bytes


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
    w = {k: (v.detach().float().cpu() if v is not None else None) for k, v in record.weights.items()}
    act = get_activation_rule(record.activation).fn
    m, d_in = w["wg_rows"].shape
    d_out = w["wd_rows"].shape[1]
    elem = record.weights["wg_rows"].element_size()
    gate_up_bias = w["bg"] is not None or w["bu"] is not None
    down_bias = w["bd"] is not None
    dense_bytes = gated_dense_bytes(d_in, m, d_out, elem, gate_up_bias, down_bias)

    x_fit, x_hold, measured_on = split_tokens(record.tokens(), config)
    g, u = F.linear(x_fit, w["wg_rows"], w["bg"]), F.linear(x_fit, w["wu_rows"], w["bu"])
    a = act(g)
    col_norm2 = w["wd_rows"].double().pow(2).sum(1)  # ||W_d[:, i]||^2
    predictor = predictor_for(w["wg_rows"], guard, config, x_fit)
    g_hat = guard_prediction(predictor, x_fit, w["bg"], g)
    energy = ((a * u) @ w["wd_rows"]).pow(2).sum(1).mean().item()

    exact_cost = float(exact_neuron_bytes("gated", d_in, d_out, elem))
    guard_row, guard_fixed = guard_bytes(predictor, d_in, elem)
    fold_bytes = float(folded_matrix_bytes(d_in, d_out, elem))
    sorted_stats = _sorted_stats(g, u, a)
    regressions = NeuronRegressions.fit(x_fit, a * u, col_norm2, config.seed) if config.fold_fit == "lstsq" else None
    variants = []
    for with_fold in (True, False):
        opts, plan = _options(g, u, a, g_hat, sorted_stats, col_norm2, with_fold, exact_cost, guard_row, guard,
                              config, regressions if with_fold else None)
        variants.append((with_fold, opts, plan, (fold_bytes if with_fold else 0.0) + guard_fixed))
    stats = {"tokens_fit": x_fit.shape[0], "tokens_holdout": x_hold.shape[0], "measured_on": measured_on,
             "elem_bytes": elem, "has_bias": gate_up_bias or down_bias, "gate_up_bias": gate_up_bias,
             "down_bias": down_bias, "dense_bytes": dense_bytes,
             "error_bound": None}  # u is unbounded: no worst-case bound for a gated FFN
    measure = {"act": act, "predictor": predictor, "guard": guard, "fold_bytes": fold_bytes,
               "guard_row": guard_row, "guard_fixed": guard_fixed, "exact_cost": exact_cost,
               "always_bytes": always_read_bytes(d_out), "regressions": regressions}
    return GatedCandidates(record, w, variants, dense_bytes, energy, stats, x_hold if x_hold.shape[0] else x_fit,
                           measure)


def finish_gated_ffn(cand: GatedCandidates, variant: int, choice: Choice, budget: float) -> FFNProfile:
    """Encode the chosen options as the op's per-neuron params and measure them on held-out tokens."""
    with_fold, opts, plan, _ = cand.variants[variant]
    m = cand.weights["wg_rows"].shape[0]
    params = encode_choice(opts, plan, choice, m)
    params["line_error"] = torch.zeros(m)
    fold_term = fitted_fold_term(cand.measure["regressions"] if with_fold else None, opts, choice,
                                 cand.weights["wd_rows"])
    stats = dict(cand.stats, budget=budget,
                 policy={"counts": choice.counts(opts.labels), "folded_matrix": with_fold,
                         "within_budget": choice.within_budget, "calibration_bytes_fraction": choice.bytes /
                         cand.dense_bytes, "calibration_rel_error": (opts.error.gather(1, choice.option[:, None])
                                                                      .sum().item() / max(cand.energy, 1e-30)) ** 0.5})
    k = cand.measure
    stats.update(_measure(cand.x_eval, cand.weights, k["act"], params, k["predictor"], k["guard"], with_fold,
                          k["fold_bytes"], (k["guard_row"], k["guard_fixed"]), k["exact_cost"], cand.dense_bytes,
                          k["always_bytes"], fold_term))
    rec, guard = cand.record, k["guard"]
    return FFNProfile(
        name=rec.name, pattern=rec.pattern, activation=rec.activation, d_in=cand.weights["wg_rows"].shape[1],
        d_hidden=m, d_out=cand.weights["wd_rows"].shape[1], slope=torch.zeros(m), intercept=params["c"],
        lower=params["lower"], upper=params["upper"], line_error=params["line_error"],
        margins={guard: params["margin"]} if guard in PREDICTOR_GUARDS else {}, stats=stats, kind="gated",
        predictor=packed_predictor(k["predictor"]), fold_term=fold_term,
    )


def fitted_fold_term(regressions: NeuronRegressions | None, opts: NeuronOptions, choice: Choice,
                     out_rows: torch.Tensor) -> torch.Tensor | None:
    """The least-squares term ``[W | b]`` standing in for every neuron the choice folds without a
    guard (``lstsq_fold.py``); None without regressions or when no neuron is folded.

    Example:
        >>> # fitted_fold_term(cand.measure["regressions"], opts, choice, weights["wd_rows"]).shape
    """
    if regressions is None or "folded" not in opts.labels:
        return None
    folded = (choice.option == opts.labels.index("folded")).nonzero().squeeze(1)
    return regressions.term(folded, out_rows) if folded.numel() else None


def fold_term_output(fold_term: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | float:
    """What the least-squares term adds to the output for tokens ``x`` (0.0 without one)."""
    if fold_term is None:
        return 0.0
    return F.linear(x, fold_term[:, :-1], fold_term[:, -1])


def fit_gated_ffn(record: FFNRecord, config: CalibrationConfig, guard: str) -> FFNProfile:
    """Fit one gated FFN's constants, ranges, guard margins and per-neuron policy for ``guard``
    within ``config.budget`` of its dense bytes read per token, and measure it on held-out tokens.

    Example:
        >>> import torch, tardis_compiler as tc
        >>> from tardis_compiler.calibrate import FFNRecord
        >>> _ = torch.manual_seed(0); d, m = 32, 64
        >>> w = {"wg_rows": torch.randn(m, d) / 4, "bg": None, "wu_rows": torch.randn(m, d) / 4, "bu": None,
        ...      "wd_rows": torch.randn(m, d) / 8, "bd": None}
        >>> rec = FFNRecord("mlp", "gated", "silu", w, max_tokens=2048, seed=0); rec.add(torch.randn(2048, d))
        >>> ffn = fit_gated_ffn(rec, tc.CalibrationConfig(budget=0.5, progress=False), "int8")
        >>> ffn.kind, ffn.stats["bytes_fraction"] <= 0.5 + 0.05
        ('gated', True)
    """
    budget = budget_of(config)
    cand = prepare_gated_ffn(record, config, guard)
    (variant, choice), = allocate([cand], budget, "layer", config.fold)
    return finish_gated_ffn(cand, variant, choice, budget)


def allocate(cands: list[GatedCandidates], budget: float, allocation: str,
             fold: bool | None = None) -> list[tuple[int, Choice]]:
    """Per FFN, the variant (with or without the folded matrix) and neuron mix to use.

    ``"layer"``: each FFN meets the budget on its own, with the variant of least error. ``"model"``:
    the FFNs share it, bytes going where they cut the most *relative* error (each FFN's error over
    its dense output's energy), one Lagrangian over all neurons. On SmolLM2, "layer" measured better
    at every budget (docs/RESULTS.md): output energy is a poor proxy for a layer's effect on the loss.
    ``fold`` restricts the variants: None both, True only with the folded matrix, False only without.

    Example:
        >>> # allocate([prepare_gated_ffn(rec, config, "int8")], 0.5, "layer")
    """
    allowed = [[i for i, v in enumerate(c.variants) if fold is None or v[0] == fold] for c in cands]
    if allocation == "model":
        layers = [[(c.variants[i][1].scaled(1.0 / max(c.energy, 1e-30)), c.variants[i][3]) for i in ids]
                  for c, ids in zip(cands, allowed)]
        picks = choose_across(layers, sum(c.budget_bytes(budget) for c in cands))
        return [(ids[k], choice) for ids, (k, choice) in zip(allowed, picks)]
    picks = []
    for c, ids in zip(cands, allowed):
        choices = {i: choose(c.variants[i][1], c.budget_bytes(budget), fixed_bytes=c.variants[i][3]) for i in ids}
        best = min(ids, key=lambda i: (not choices[i].within_budget, choices[i].error))
        picks.append((best, choices[best]))
    return picks


def budget_of(config: CalibrationConfig) -> float:
    """The budget to fit: ``config.budget``, or 0.5 of dense when none is set."""
    return config.budget if config.budget is not None else 0.5


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


def guard_bytes(predictor: LowBitGuard | SVDPredictor | None, d_in: int, elem: int) -> tuple[float, float]:
    """Bytes the guard reads per token: (per guarded neuron, once for all of them), as the pack
    lays them out (``runtime/layout.py``): a low-bit row and its scales, the full row for "exact",
    or the SVD's Q row, plus the neuron's band; the SVD's P (r x d_in, float32) once.

    Example:
        >>> guard_bytes(None, 16, 4)
        (72.0, 0.0)
    """
    if isinstance(predictor, SVDPredictor):
        return float(guard_neuron_bytes("svd", d_in, elem, rank=predictor.rank)), float(predictor.rank * d_in * 4)
    if predictor is None:
        return float(guard_neuron_bytes("exact", d_in, elem)), 0.0
    return float(guard_neuron_bytes(predictor.kernel, d_in, elem, predictor.group_size)), 0.0


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


def _sorted_stats(g: torch.Tensor, u: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """g sorted per neuron, and prefix sums (float64) of u^2, a u^2 and a^2 u^2 in that order:
    every window's least-squares constant and error in O(1)."""
    order = g.argsort(dim=0)
    a_sorted, u2_sorted = a.gather(0, order).double(), u.gather(0, order).double().pow(2)
    prefix = {"uu": prefix_sums(u2_sorted), "auu": prefix_sums(a_sorted * u2_sorted),
              "aauu": prefix_sums(a_sorted * a_sorted * u2_sorted)}
    return g.gather(0, order), prefix


def _options(g, u, a, g_hat, sorted_stats, col_norm2, with_fold: bool, exact_cost: float, guard_row: float,
             guard: str, config: CalibrationConfig,
             regressions: NeuronRegressions | None = None) -> tuple[NeuronOptions, dict]:
    """Per-neuron error and cost of each option, and the ranges/constants/margins behind them.
    With ``regressions`` a folded neuron's error is its regression's (its constant is then 0: the
    least-squares term carries it)."""
    n, m = g.shape
    u2 = u.pow(2)
    labels, errors, costs = ["exact"], [torch.zeros(m, dtype=torch.float64)], [torch.full((m,), exact_cost)]
    plan: dict[str, dict[str, torch.Tensor]] = {}

    g_sorted, prefix = sorted_stats
    sigma = (g_hat - g).std(dim=0) if g_hat is not g else None
    labels.append("folded" if with_fold else "dropped")
    if regressions is not None:
        errors.append(col_norm2 * regressions.error)
        plan[labels[-1]] = {"c": torch.zeros(m)}
    else:
        c_all = _weighted_constant(prefix, with_fold)
        errors.append(col_norm2 * _window_sse(prefix["uu"][-1], prefix["auu"][-1], prefix["aauu"][-1], c_all) / n)
        plan[labels[-1]] = {"c": c_all.float()}
    costs.append(torch.zeros(m, dtype=torch.float64))

    for p in COVERAGES:
        lower, upper, c = _best_window(g_sorted, prefix, p, with_fold)
        error_terms = (a - c).square_().mul_(u2)
        margin = guard_margins(guard, g, g_hat, lower, upper, error_terms, col_norm2, config, sigma)
        flags = (g_hat < lower + margin) | (g_hat > upper - margin)
        kept = error_terms.masked_fill_(flags, 0.0)
        errors.append(col_norm2 * kept.sum(0).double() / n)  # float32 pairwise sums: ample here
        costs.append(guard_row + flags.sum(0).double() / n * exact_cost)
        labels.append(f"guarded@{p}")
        plan[labels[-1]] = {"c": c, "lower": lower, "upper": upper, "margin": margin}
    return NeuronOptions(labels, torch.stack(errors, 1), torch.stack(costs, 1)), plan


def _weighted_constant(prefix: dict, with_fold: bool) -> torch.Tensor:
    """Least-squares constant for act(g) * u ~= c * u over all tokens: the u^2-weighted mean of
    act(g) (0 without a fold)."""
    if not with_fold:
        return torch.zeros(prefix["uu"].shape[1], dtype=torch.float64)
    return prefix["auu"][-1] / prefix["uu"][-1].clamp(min=1e-30)


def _window_sse(uu, auu, aauu, c):
    """sum (a - c)^2 u^2 from the window's sums of u^2, a u^2 and a^2 u^2."""
    return (aauu - 2 * c * auu + c * c * uu).clamp(min=0)


def prefix_sums(v: torch.Tensor) -> torch.Tensor:
    """Column-wise prefix sums with a leading zero row: window sums are differences of two rows."""
    return torch.cat([torch.zeros(1, v.shape[1], dtype=v.dtype), v.cumsum(0)])


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


def encode_choice(opts: NeuronOptions, plan: dict, choice: Choice, m: int,
                  values: tuple[str, ...] = ("c",)) -> dict[str, torch.Tensor]:
    """Per-neuron ``values`` (the constant c, or a line's slope and intercept), range and margin
    encoding the chosen options for the fused op: exact neurons get an empty range (+inf, -inf) and
    zero values, so every guard flags them; folded and dropped neurons an unbounded one, so none does.

    Example:
        >>> # encode_choice(opts, plan, choose(opts, budget), m)["lower"]
    """
    out = {key: torch.zeros(m) for key in (*values, "margin")}
    out["lower"], out["upper"] = torch.full((m,), _INF), torch.full((m,), -_INF)
    for k, label in enumerate(opts.labels):
        sel = choice.option == k
        if label == "exact" or not sel.any():
            continue
        for key in values:
            out[key][sel] = plan[label][key][sel]
        if label.startswith("guarded"):
            for key in ("lower", "upper", "margin"):
                out[key][sel] = plan[label][key][sel]
        else:
            out["lower"][sel], out["upper"][sel] = -_INF, _INF
    return out


def policy_measurements(flags: torch.Tensor, outside: torch.Tensor, always: torch.Tensor, guarded: torch.Tensor,
                        delta_y: torch.Tensor, dense_y: torch.Tensor, predictor, guard: str, guard_cost: tuple,
                        fixed: float, exact_cost: float, dense_bytes: float) -> dict[str, Any]:
    """Stats of a fitted mix on held-out tokens, shared by gated and plain FFNs: coverage, and for
    ``guard`` flag rate, recall, output error and bytes per token (``fixed`` = what is read whatever
    the guard, e.g. the folded matrix and output bias).

    Example:
        >>> # stats.update(policy_measurements(flags, outside, always, guarded, dy, y, ...))
    """
    any_guarded = bool(guarded.any())
    guard_read = guarded.sum().item() * guard_cost[0] + guard_cost[1] * any_guarded
    fixed_bytes = fixed + guard_read
    per_token = fixed_bytes + flags.float().sum(1).mean().item() * exact_cost
    missed = outside & ~flags
    guard_stats = {
        "flag_rate": flags[:, guarded].float().mean().item() if any_guarded else 0.0,
        "corrected_rate": flags.float().mean().item(),
        "recall": 1.0 - missed.sum().item() / max(1, outside.sum().item()),
        "rel_error": (delta_y.norm() / dense_y.norm().clamp(min=1e-30)).item(),
        "max_abs_error": delta_y.abs().max().item() if delta_y.numel() else 0.0,
        "kernel": predictor.kernel if predictor is not None else guard,
        "bytes": guard_read, "bytes_per_token": per_token,
        # bytes per token = fixed_bytes + corrected_rate * m * exact_cost (the meter's formula)
        "fixed_bytes": fixed_bytes, "exact_cost": exact_cost,
    }
    return {
        "coverage": 1.0 - (outside | always).float().mean().item(),  # (token, neuron) pairs the fold serves
        "guards": {guard: guard_stats},
        "bytes_fraction": per_token / dense_bytes,
    }


def _measure(x, w, act, params, predictor, guard, with_fold, fold_bytes, guard_cost, exact_cost, dense_bytes,
             always_bytes, fold_term) -> dict[str, Any]:
    """What the chosen policy does on ``x`` (held-out tokens): coverage, flags, recall, output
    error and bytes read per token."""
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
    if guard == "all":
        fold_term = None  # the pack leaves the term out: every neuron is exact
    delta_y = delta_h @ w["wd_rows"] + fold_term_output(fold_term, x)
    fixed = (fold_bytes if with_fold else 0.0) + always_bytes
    return policy_measurements(flags, outside, always, guarded, delta_y, (a * u) @ w["wd_rows"],
                               predictor, guard, guard_cost, fixed, exact_cost, dense_bytes)
