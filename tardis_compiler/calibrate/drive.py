"""Calibrate: record each FFN's inputs on real text, then fit every neuron's range and line.

Per neuron i, with z_i = W1[i] . x + b1_i over the calibration tokens:
- range [l_i, u_i]: the shortest interval holding a fraction ``coverage`` of the z_i;
- line a_i z + c_i: least squares of act(z) on the samples inside the range;
- guard margin (per low-bit guard): s * std(z_hat_i - z_i), z_hat from the guard's own kernel, with
  one scale s per FFN, the smallest that flags ``target_recall`` of the out-of-range inputs.
A held-out share of the tokens then measures what the user will see: range coverage, the guard's
flag rate and recall (flagged out-of-range / all out-of-range), and the FFN's output error.

We record FFN *inputs* x (d per token), not z (m = 4d per token), and recompute z when fitting.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
import warnings
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F

from .activations import get_activation_rule
from .config import DEFAULT_GUARDS, LOW_BIT_GUARDS, CalibrationConfig
from .profile import FFNProfile, Profile
from .runtime.guard import LowBitGuard

log = logging.getLogger("tardis_compiler")
_FEW_TOKENS = 64  # below this, calibration warns that its fit will not generalise


class FFNRecord:
    """One FFN's weights (live references, read when fitting) and a reservoir of its inputs."""

    def __init__(self, name: str, pattern: str, activation: str, weights: dict[str, torch.Tensor | None],
                 max_tokens: int, seed: int) -> None:
        self.name, self.pattern, self.activation = name, pattern, activation
        # Plain: w1_rows (m, d_in), b1, w2_rows (m, d_out), b2. Gated: wg_rows, bg, wu_rows, bu
        # (m, d_in) and (m,), wd_rows (m, d_out), bd.
        self.weights = weights
        self.max_tokens = max_tokens
        self.samples: torch.Tensor | None = None
        self.filled = 0
        self.seen = 0
        self.dropped = 0  # token rows with a NaN or Inf, left out
        self._lock = threading.Lock()
        self._generator = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        """Reservoir-sample the rows of ``x`` (..., d_in) so any prefix of tokens is represented.
        Rows with a NaN or Inf are dropped (and counted): one would poison every neuron's fit."""
        rows = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        finite = torch.isfinite(rows).all(dim=1)
        with self._lock:
            if not bool(finite.all()):
                self.dropped += int((~finite).sum())
                rows = rows[finite]
            self._add(rows)

    def _add(self, rows: torch.Tensor) -> None:
        if self.samples is None:
            # A normal tensor even when the first call runs under inference_mode: later calls may
            # run under no_grad, where an inference tensor could not be written to.
            with torch.inference_mode(False):
                self.samples = torch.empty(self.max_tokens, rows.shape[1])
        take = min(rows.shape[0], self.max_tokens - self.filled)
        self.samples[self.filled:self.filled + take] = rows[:take]
        self.filled += take
        rest = rows[take:]
        if rest.shape[0]:
            positions = torch.arange(self.seen + take + 1, self.seen + rows.shape[0] + 1)
            slots = (torch.rand(rest.shape[0], generator=self._generator) * positions).long()
            keep = slots < self.max_tokens
            self.samples[slots[keep]] = rest[keep]
        self.seen += rows.shape[0]

    @property
    def gated(self) -> bool:
        """True for a gated FFN (weights wg_rows, wu_rows, wd_rows and biases)."""
        return "wg_rows" in self.weights

    def tokens(self) -> torch.Tensor:
        """The kept input rows, (n, d_in) float32."""
        return self.samples[:self.filled] if self.samples is not None else torch.empty(0, 0)


class Recorder:
    """Collects ``FFNRecord``s while a recording graph runs (see ``recording``)."""

    def __init__(self, config: CalibrationConfig) -> None:
        self.config = config
        self.ffns: dict[str, FFNRecord] = {}
        # Gated FFNs' per-neuron options do not depend on the budget: computed once per guard and
        # config, and reused by every budget or allocation fitted from this recorder.
        self.prepared: dict = {}

    def register(self, name: str, pattern: str, activation: str, weights: dict) -> None:
        """Declare an FFN, or hand it its weights again (each call of a recording graph does)."""
        if name not in self.ffns:
            seed = self.config.seed + len(self.ffns)
            self.ffns[name] = FFNRecord(name, pattern, activation, weights, self.config.max_tokens, seed)
        else:
            self.ffns[name].weights = weights

    def release_weights(self) -> None:
        """Let go of the FFNs' weights until the next ``register`` (an auto-calibration waiting for
        its next call must not keep a deleted model alive)."""
        for record in self.ffns.values():
            record.weights = None

    def fit(self, source: str, config: CalibrationConfig | None = None, guard: str | None = None) -> Profile:
        """Fit every recorded FFN (see the module docstring) into a ``Profile``; ``config``
        overrides the recorder's (e.g. another coverage or budget over the same recorded tokens).

        With ``config.budget`` set, every FFN gets a per-neuron mix within it (calibrate_budget.py),
        priced for ``guard`` (None: each kind's default, ``DEFAULT_GUARDS``). Without one, gated
        FFNs (and every FFN with ``guard="svd"``) get that mix at 0.5 of dense, and plain FFNs the
        coverage fit of ``fit_ffn``, for every low-bit guard at once."""
        config = config or self.config
        empty = [n for n, r in self.ffns.items() if r.filled == 0]
        poisoned = {n: r.dropped for n, r in self.ffns.items() if r.dropped}
        if empty and all(n in poisoned for n in empty):
            raise ValueError(f"every calibration token of FFNs {empty[:3]} has a NaN or Inf in its input: the "
                             "calibration inputs (or the model's weights) are not finite; check them")
        if not self.ffns or empty:
            raise ValueError(
                "calibration saw no tokens" + (f" for FFNs {empty[:3]}" if empty else "")
                + ": pass a non-empty iterable of model inputs (tensors or dicts of keyword arguments)")
        fewest = min(r.filled for r in self.ffns.values())
        if fewest < _FEW_TOKENS:
            warnings.warn(f"tardis: calibration saw only {fewest} token(s) per FFN: ranges, constants and guard "
                          f"margins fitted on so few generalise poorly; calibrate on a few hundred tokens or more "
                          "of real text (a few paragraphs)", stacklevel=2)
        if poisoned:
            worst = max(poisoned.values())
            warnings.warn(f"tardis: calibration dropped up to {worst} token(s) per FFN whose input had a NaN or Inf "
                          f"({len(poisoned)} FFNs, e.g. {next(iter(poisoned))!r}); the profile is fitted on the rest",
                          stacklevel=2)
        mix_all = config.budget is not None or guard == "svd"  # the svd guard's factors come with a mix
        by_policy = [r for r in self.ffns.values() if r.gated or mix_all]
        by_coverage = [r for r in self.ffns.values() if r not in by_policy]
        ffns = {r.name: fit_ffn(r, config) for r in _progress(by_coverage, config, "tardis: fitting FFN ranges")}
        if by_policy:  # fitted together: with allocation="model" they share one budget
            from .calibrate_budget import fit_policy_ffns

            guards = {kind: guard or default for kind, default in DEFAULT_GUARDS.items()}
            ffns.update(fit_policy_ffns(_progress(by_policy, config, "tardis: fitting per-neuron mixes"), config,
                                        guards, self.prepared))
        ffns = {name: ffns[name] for name in self.ffns}  # graph order
        tokens = max(r.seen for r in self.ffns.values())
        return Profile(ffns=ffns, config=config, tokens=tokens, source=source)


def _progress(records: list, config: CalibrationConfig, desc: str):
    if config.progress and len(records) > 1:
        from tqdm.auto import tqdm

        return tqdm(records, desc=desc, leave=False)
    return records


class _ActiveRecorders(threading.local):
    """The recorders of ``recording`` blocks, per thread: a graph run in one thread records into
    that thread's recorder only."""

    def __init__(self) -> None:
        self.stack: list[Recorder] = []


_ACTIVE = _ActiveRecorders()


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[Recorder]:
    """Route ``record_ffn_input`` calls made inside the block (in this thread) to ``recorder``."""
    _ACTIVE.stack.append(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.stack.remove(recorder)


def active_recorder() -> Recorder | None:
    """The innermost ``recording`` block's recorder in this thread, or None."""
    return _ACTIVE.stack[-1] if _ACTIVE.stack else None


def record_ffn_input(x: torch.Tensor, name: str) -> None:
    """Graph hook inserted by the recording pass: hand an FFN's input to the active recorder."""
    recorder = active_recorder()
    if recorder is not None and name in recorder.ffns:
        recorder.ffns[name].add(x)


def record(model: torch.nn.Module, batches: Iterable[Any], config: CalibrationConfig | None = None) -> Recorder:
    """Run ``batches`` through ``model`` and keep each FFN's inputs (see ``calibrate``); fit the
    result with ``recorder.fit(source, config)``, as often as you like.

    Example:
        >>> import torch, tardis_compiler as tc
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
        >>> rec = record(mlp, [torch.randn(32, 16)], tc.CalibrationConfig(progress=False))
        >>> rec.fit("demo").ffns[""].d_in
        16
    """
    from .backend import RECORDING_BACKEND

    config = config or CalibrationConfig()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"calibrate() needs an nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("calibrate() needs the model in eval mode (folding is an inference transform): "
                         "call model.eval() first")
    batches = list(batches) if not isinstance(batches, (list, tuple)) else batches
    if len(batches) == 0:
        raise ValueError("calibrate() got an empty calibration set: pass at least one batch of real "
                         "inputs (e.g. a few tokenized paragraphs)")
    recorder = Recorder(config)
    # One backend object for every calibration: dynamo reuses its graphs across calls (a new
    # backend per call would recompile each time and, by the 9th, hit dynamo's recompile limit).
    compiled = torch.compile(model, backend=RECORDING_BACKEND, dynamic=None)
    progress = batches
    if config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(batches, desc="tardis: recording FFN inputs")
    with torch.no_grad(), recording(recorder):
        for batch in progress:
            _call(compiled, batch)
    if not recorder.ffns:
        raise ValueError("calibrate() found no FFN in this model; tardis_compiler.explain(model, inputs) "
                         "lists what was matched and why patterns were skipped")
    recorder.batches = len(batches)
    return recorder


def calibrate(model: torch.nn.Module, batches: Iterable[Any], config: CalibrationConfig | None = None) -> Profile:
    """Record every FFN's inputs on ``batches`` and fit per-neuron ranges, lines and guard margins.

    ``batches`` yields model inputs: a tensor (``model(t)``), a tuple (``model(*t)``) or a dict of
    keyword arguments (``model(**d)``). Runs under ``torch.no_grad()``; the model is not modified.

    Example:
        >>> import torch, tardis_compiler as tc
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
        >>> profile = tc.calibrate(mlp, [torch.randn(32, 16) for _ in range(4)],
        ...                        tc.CalibrationConfig(progress=False))
        >>> list(profile.ffns), profile.ffns[""].d_hidden
        ([''], 64)
    """
    recorder = record(model, batches, config)
    return recorder.fit(source=f"calibrate(): {recorder.batches} batches")


def calibrate_for_budget(model: torch.nn.Module, batches: Iterable[Any], budget: float, guard: str | None = None,
                         config: CalibrationConfig | None = None, recorder: Recorder | None = None) -> Profile:
    """Calibrate so the model's FFNs read at most ``budget`` of their dense bytes per token.

    Every FFN, plain or gated, meets it by a per-neuron mix (exact, guarded at some coverage,
    folded unguarded, dropped: calibrate_budget.py) priced for ``guard`` (None: each FFN kind's
    default guard). Bytes are those ``explain`` reports, at the flag rate measured on the held-out
    calibration tokens. Pass a ``recorder`` from ``record(model, batches, config)`` to fit several
    budgets from one recording (``batches`` is then not run again).

    Example:
        >>> import torch, tardis_compiler as tc
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
        >>> cfg = tc.CalibrationConfig(progress=False)
        >>> profile = calibrate_for_budget(mlp, [torch.randn(256, 64) for _ in range(4)], 0.6, "int8", cfg)
        >>> profile.bytes_fraction("int8") <= 0.6 + 0.02
        True
    """
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget is a fraction of dense FFN bytes read per token, in (0, 1]; got {budget}")
    config = dataclasses.replace(config or CalibrationConfig(), budget=budget)
    recorder = recorder if recorder is not None else record(model, batches, config)
    profile = recorder.fit(f"calibrate_for_budget({budget}, {guard!r}): {recorder.batches} batches", config, guard)
    over = [name for name, ffn in profile.ffns.items() if not ffn.stats["policy"]["within_budget"]]
    if over:
        raise ValueError(f"budget {budget} is below what tardis reads even with every neuron dropped (the output "
                         f"bias and the guard) for FFNs {over[:3]}: raise the budget")
    return profile


def _call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def fit_ffn(record: FFNRecord, config: CalibrationConfig) -> FFNProfile:
    """Fit one FFN's per-neuron ranges, lines and guard margins, and measure them on held-out tokens."""
    w = {k: (v.detach().float().cpu() if v is not None else None) for k, v in record.weights.items()}
    act = get_activation_rule(record.activation).fn
    x_fit, x_hold, measured_on = split_tokens(record.tokens(), config)
    n_hold = x_hold.shape[0]
    z_fit = F.linear(x_fit, w["w1_rows"], w["b1"])

    lower, upper = shortest_intervals(z_fit, config.coverage)
    slope, intercept = fit_lines(z_fit, act(z_fit), lower, upper)
    line_error = max_line_error(act, slope, intercept, lower, upper)

    stats: dict[str, Any] = {"tokens_fit": x_fit.shape[0], "tokens_holdout": x_hold.shape[0],
                             "elem_bytes": record.weights["w1_rows"].element_size(),
                             "has_bias": record.weights["b1"] is not None or record.weights["b2"] is not None}
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


def split_tokens(x: torch.Tensor, config: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Seeded split of recorded tokens into (fit, holdout, what stats are measured on); sets of
    fewer than 20 tokens get no holdout.

    Example:
        >>> fit, hold, on = split_tokens(torch.randn(100, 4), CalibrationConfig(holdout_fraction=0.2))
        >>> fit.shape[0], hold.shape[0], on
        (80, 20, 'holdout')
    """
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed))
    n_hold = int(x.shape[0] * config.holdout_fraction) if x.shape[0] >= 20 else 0
    measured_on = "holdout" if n_hold else "fit tokens (too few for a holdout)"
    return x[perm[n_hold:]], x[perm[:n_hold]], measured_on


def shortest_intervals(z: torch.Tensor, coverage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``z`` (tokens, neurons), the shortest interval holding ``coverage`` of it.

    Example:
        >>> lo, hi = shortest_intervals(torch.tensor([[0.], [1.], [2.], [10.]]), 0.75)
        >>> lo.item(), hi.item()
        (0.0, 2.0)
    """
    n = z.shape[0]
    k = max(1, min(n, math.ceil(coverage * n)))
    ordered, _ = z.sort(dim=0)
    widths = ordered[k - 1:] - ordered[: n - k + 1]
    start = widths.argmin(dim=0)
    cols = torch.arange(z.shape[1])
    return ordered[start, cols].clone(), ordered[start + k - 1, cols].clone()


def fit_lines(z: torch.Tensor, y: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
    """Per-column least-squares line y ~ a z + c over the samples inside [lower, upper].

    Columns whose in-range samples are (nearly) constant in z get a = 0, c = mean(y).

    Example:
        >>> z = torch.linspace(-1, 1, 50)[:, None]
        >>> a, c = fit_lines(z, 3 * z + 1, torch.tensor([-1.]), torch.tensor([1.]))
        >>> round(a.item(), 4), round(c.item(), 4)
        (3.0, 1.0)
    """
    inside = ((z >= lower) & (z <= upper)).double()
    zd, yd = z.double(), y.double()
    n = inside.sum(0).clamp(min=1)
    mean_z = (inside * zd).sum(0) / n
    mean_y = (inside * yd).sum(0) / n
    dz = (zd - mean_z) * inside
    var = (dz * dz).sum(0)
    cov = (dz * (yd - mean_y)).sum(0)
    flat = var <= 1e-12 * n
    slope = torch.where(flat, torch.zeros_like(var), cov / var.clamp(min=1e-30))
    intercept = mean_y - slope * mean_z
    return slope.float(), intercept.float()


def max_line_error(act, slope, intercept, lower, upper, points: int = 257) -> torch.Tensor:
    """max over [lower, upper] of |act(z) - (slope z + intercept)|, per neuron, on a fine grid."""
    t = torch.linspace(0, 1, points, dtype=torch.float64)[:, None]
    grid = lower.double() + t * (upper.double() - lower.double())
    err = act(grid) - (slope.double() * grid + intercept.double())
    return err.abs().amax(0).float()


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
