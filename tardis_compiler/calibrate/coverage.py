"""Coverage: the uniform-coverage fit of a plain FFN without a budget (``fit_ffn``).

Per neuron i, with z_i = W1[i] . x + b1_i over the calibration tokens (the same rule for every
neuron, so the ranges carry a worst-case error bound):

- range [l_i, u_i]: the shortest interval holding a fraction ``coverage`` of the z_i;
- line a_i z + c_i: least squares of act(z) on the samples inside the range;
- guard margin (per low-bit guard): s * std(z_hat_i - z_i), z_hat from the guard's own kernel, with
  one scale s per FFN, the smallest that flags ``target_recall`` of the out-of-range inputs.

A held-out share of the tokens then measures what the user will see: range coverage, the guard's
flag rate and recall (flagged out-of-range / all out-of-range), and the FFN's output error. Every
low-bit guard is fitted at once, so one profile serves ``guard="int8"``, ``"int4"`` and ``"int2"``.
With a budget (or the "svd" guard), plain FFNs get a per-neuron mix instead (``plain.py``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..activations import get_activation_rule
from ..config import LOW_BIT_GUARDS, CalibrationConfig
from ..profile import FFNProfile
from ..runtime.guard import LowBitGuard
from .margins import recall_margins
from .ranges import fit_lines, max_line_error, shortest_intervals, split_tokens

if TYPE_CHECKING:  # the recorder's module imports the fitting steps
    from .record import FFNRecord


def fit_ffn(record: FFNRecord, config: CalibrationConfig) -> FFNProfile:
    """Fit one FFN's per-neuron ranges, lines and guard margins, and measure them on held-out tokens.

    Example:
        >>> w = {"w1_rows": torch.randn(64, 16), "b1": None, "w2_rows": torch.randn(64, 16), "b2": None}
        >>> from tardis_compiler.calibrate.record import FFNRecord
        >>> rec = FFNRecord("mlp", "linear-act-linear", "gelu", w, max_tokens=512, seed=0)
        >>> rec.add(torch.randn(512, 16))
        >>> ffn = fit_ffn(rec, CalibrationConfig(coverage=0.9, group_size=16, progress=False))
        >>> sorted(ffn.margins), 0.8 < ffn.stats["coverage"] < 0.97
        (['int2', 'int4', 'int8'], True)
    """
    w = record.float_weights(config.weights)
    act = get_activation_rule(record.activation).fn
    x_fit, x_hold, measured_on = split_tokens(record.tokens(), config)
    n_hold = x_hold.shape[0]
    z_fit = F.linear(x_fit, w["w1_rows"], w["b1"])

    lower, upper = shortest_intervals(z_fit, config.coverage)
    slope, intercept = fit_lines(z_fit, act(z_fit), lower, upper)
    line_error = max_line_error(act, slope, intercept, lower, upper)

    stats: dict[str, Any] = {"tokens_fit": x_fit.shape[0], "tokens_holdout": x_hold.shape[0],
                             "elem_bytes": record.weights["w1_rows"].element_size(),
                             "has_bias": record.weights["b1"] is not None or record.weights["b2"] is not None,
                             "weights": config.weights or "dense"}
    x_eval = x_hold if n_hold else x_fit  # tiny sets: report in-sample numbers, and say so
    stats["measured_on"] = measured_on
    z_eval = F.linear(x_eval, w["w1_rows"], w["b1"])
    outside = (z_eval < lower) | (z_eval > upper)
    stats["coverage"] = 1.0 - outside.float().mean().item()
    # |dy|_inf <= sum_i |W2[:, i]| line_error_i whenever the guard misses no out-of-range neuron.
    stats["error_bound"] = (w["w2_rows"].abs() * line_error[:, None]).sum(0).max().item()
    line = lambda z: slope * z + intercept  # noqa: E731
    dense_y = F.linear(act(z_eval), w["w2_rows"].t(), w["b2"])
    stats["guards"] = {"exact": _guard_stats(outside, outside, act, line, z_eval, w["w2_rows"], dense_y)}

    margins = {}
    for guard, bits in LOW_BIT_GUARDS.items():
        low_bit = LowBitGuard.build(w["w1_rows"], bits, config.group_size)
        b1 = w["b1"] if w["b1"] is not None else 0.0
        z_hat_fit = low_bit.predict(x_fit) + b1
        margins[guard] = recall_margins(z_fit, z_hat_fit, lower, upper, config.target_recall)
        z_hat = low_bit.predict(x_eval) + b1
        flags = (z_hat < lower + margins[guard]) | (z_hat > upper - margins[guard])
        stats["guards"][guard] = _guard_stats(flags, outside, act, line, z_eval, w["w2_rows"], dense_y)
        stats["guards"][guard].update(kernel=low_bit.kernel, group_size=low_bit.group_size,
                                      bytes=low_bit.bytes_read(*w["w1_rows"].shape))
    return FFNProfile(
        name=record.name, pattern=record.pattern, activation=record.activation,
        d_in=w["w1_rows"].shape[1], d_hidden=w["w1_rows"].shape[0], d_out=w["w2_rows"].shape[1],
        slope=slope, intercept=intercept, lower=lower, upper=upper, line_error=line_error,
        margins=margins, stats=stats,
    )


def _guard_stats(flags, outside, act, line, z, w2_rows, dense_y) -> dict[str, float]:
    missed = outside & ~flags
    # Unflagged neurons use the line: their error is line(z) - act(z), exact elsewhere.
    delta_h = torch.where(flags, torch.zeros_like(z), line(z) - act(z))
    delta_y = delta_h @ w2_rows
    return {
        "flag_rate": flags.float().mean().item(),
        "recall": 1.0 - missed.sum().item() / max(1, outside.sum().item()),
        "rel_error": (delta_y.norm() / dense_y.norm().clamp(min=1e-30)).item(),
        "max_abs_error": delta_y.abs().max().item() if delta_y.numel() else 0.0,
    }
