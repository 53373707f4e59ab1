"""Validated configuration: what calibration fits, and what the backend does with it.

Both classes validate in ``__post_init__`` and round-trip through plain dicts (JSON), so a profile
records the exact config it was calibrated with.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from typing import Any, Mapping

#: Guards: a low-bit copy of W1 predicts z (int2/int4/int8); "svd" a whitened rank-r factorisation
#: of W1 fitted to the calibration inputs (SVDP; only with a per-neuron mix, i.e. a budget); "exact"
#: computes z in full (slow, for testing); "all" flags every neuron, which must reproduce the dense
#: model (exactness invariant).
LOW_BIT_GUARDS = {"int2": 2, "int4": 4, "int8": 8}
PREDICTOR_GUARDS = (*LOW_BIT_GUARDS, "svd")  # guards that predict z and carry calibrated margins
GUARDS = (*PREDICTOR_GUARDS, "exact", "all")
#: The guard each FFN kind gets when none is given: the one that measured best (docs/RESULTS.md):
#: int8 on MiniLM's plain FFNs (fewest bytes for its recall), int4 on SmolLM2's gated FFNs (its
#: cheaper rows leave more of the budget to exact neurons: lower perplexity at every budget).
DEFAULT_GUARDS = {"plain": "int8", "gated": "int4"}
INNER_COMPILERS = ("inductor", "eager")


@dataclasses.dataclass
class CalibrationConfig:
    """How calibration picks each neuron's range and line, and sizes the guard's margin.

    Args:
        coverage: fraction p of a neuron's calibration inputs its range must hold (the shortest
            interval covering p). About 1 - p of neurons take the exact path per token.
        max_tokens: token rows kept per FFN (reservoir-sampled beyond that), bounding memory.
        holdout_fraction: share of kept tokens not used for fitting, on which guard recall and
            flag rate are measured.
        target_recall: the guard's margins are the smallest (a common multiple of each neuron's
            prediction-error std) that flag this fraction of out-of-range inputs on the fitting
            tokens; higher favours accuracy, lower fewer flags (speed).
        group_size: quantization group size of the guard's low-bit W1 copy.
        svd_rank: rank of the "svd" guard's factorisation; 0 (default): a quarter of d_in.
        budget: FFN weight bytes read per token, as a fraction of the dense FFN's, in (0, 1].
            Every FFN chooses each neuron's option (exact, guarded at some coverage, folded,
            dropped) to fit it with the least calibration error. None: gated FFNs fit 0.5, plain
            FFNs use ``coverage`` for every neuron (ranges with a worst-case error bound).
        allocation: how FFNs fitted to a budget share it: "layer" (each meets it) or "model" (bytes
            go to the FFNs whose relative error they cut most; the model as a whole meets it).
        fold: with a budget, whether the mix may fold neurons into the matrix ``Wf``: None (default)
            takes whichever of the two variants has less error per FFN, False never folds (neurons
            off the exact path contribute nothing: contextual activation sparsity, c = 0), True always.
        fold_fit: how neurons folded without a guard enter ``Wf``: "lstsq" (one least-squares map of
            x for their total contribution, ``lstsq_fold.py``) or "lines" (each neuron's own line or
            constant).
        seed: seeds the token reservoir.
        progress: show a progress bar.

    Example:
        >>> CalibrationConfig(coverage=0.7).coverage
        0.7
        >>> CalibrationConfig.from_dict(CalibrationConfig().to_dict()) == CalibrationConfig()
        True
    """

    coverage: float = 0.85
    max_tokens: int = 8192
    holdout_fraction: float = 0.2
    target_recall: float = 0.999
    group_size: int = 64
    svd_rank: int = 0
    budget: float | None = None
    allocation: str = "layer"
    fold: bool | None = None
    fold_fit: str = "lstsq"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        _real(self.coverage, "coverage", 0.0, 1.0, "(0, 1]", low_open=True)
        _integer(self.max_tokens, "max_tokens", 16)
        _real(self.holdout_fraction, "holdout_fraction", 0.0, 0.9, "[0, 0.9)", high_open=True)
        _real(self.target_recall, "target_recall", 0.0, 1.0, "(0, 1]", low_open=True)
        _integer(self.group_size, "group_size", 8)
        _check(self.group_size % 8 == 0, f"group_size must be a positive multiple of 8, got {self.group_size}")
        _integer(self.svd_rank, "svd_rank", 0, "(0: a quarter of d_in)")
        _check(self.allocation in ("layer", "model"),
               f"allocation must be 'layer' or 'model', got {self.allocation!r}")
        _check(self.fold is None or isinstance(self.fold, bool), f"fold must be None, True or False, got {self.fold!r}")
        _check(self.fold_fit in ("lstsq", "lines"), f"fold_fit must be 'lstsq' or 'lines', got {self.fold_fit!r}")
        if self.budget is not None:
            _real(self.budget, "budget", 0.0, 1.0, "(0, 1] (a fraction of dense FFN bytes read per token)",
                  low_open=True)
        _integer(self.seed, "seed", None)
        _check(isinstance(self.progress, bool), f"progress must be True or False, got {self.progress!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON. Example: ``CalibrationConfig().to_dict()["coverage"]``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CalibrationConfig":
        """Inverse of ``to_dict``; unknown keys are an error naming the valid ones."""
        return cls(**_known_keys(cls, data, "calibration config"))


@dataclasses.dataclass
class TardisOptions:
    """Options of ``torch.compile(model, backend="tardis", options=...)`` and ``explain``.

    Args:
        profile: a ``Profile`` from ``calibrate`` (or a path to a saved one). Without one, the
            compiled model runs dense for ``calibration_calls`` calls while it records FFN
            inputs, then calibrates and switches to the folded graph.
        guard: "int8", "int4", "int2", "svd", "exact" or "all" (see ``GUARDS``); None (default) takes
            per FFN kind the one that measured best, ``DEFAULT_GUARDS``: int8 for plain FFNs,
            int4 for gated ones.
        inner: compiler for the rewritten graph: "inductor" (default) or "eager" (debugging).
        calibration_calls: calls recorded before auto-calibration (no-profile mode).
        calibration: ``CalibrationConfig`` (or dict) for auto-calibration.
        budget: shortcut for ``calibration.budget``: FFN weight bytes read per token as a
            fraction of dense (``{"budget": 0.5}``: half), met per FFN by its neuron mix.
        skip: FFN names or regexes to leave dense.
        dense_above: calls with more than this many tokens (prefill, batches) run the dense FFN
            instead of the pack: "auto" (default) where it measured faster on CPU (``DENSE_ABOVE``
            in runtime/ffn_op.py: 4 tokens in bfloat16, 16 otherwise); an int; or None, never
            (every token takes the approximation, e.g. to measure its perplexity).

    Example:
        >>> TardisOptions.from_mapping({"guard": "exact", "inner": "eager"}).guard
        'exact'
    """

    profile: Any = None
    guard: str | None = None
    inner: str = "inductor"
    calibration_calls: int = 8
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    skip: tuple[str, ...] = ()
    budget: float | None = None
    dense_above: int | str | None = "auto"

    def __post_init__(self) -> None:
        _check(self.guard is None or (isinstance(self.guard, str) and self.guard in GUARDS),
               f"guard must be one of {GUARDS} or None, got {self.guard!r}")
        _check(isinstance(self.inner, str) and self.inner in INNER_COMPILERS,
               f"inner must be one of {INNER_COMPILERS}, got {self.inner!r}")
        _integer(self.calibration_calls, "calibration_calls", 1)
        if self.dense_above is not None and self.dense_above != "auto":
            _integer(self.dense_above, "dense_above", 0, "(or 'auto', or None for never)")
        if isinstance(self.calibration, Mapping):
            self.calibration = CalibrationConfig.from_dict(self.calibration)
        _check(isinstance(self.calibration, CalibrationConfig),
               f"calibration must be a CalibrationConfig or a dict of its fields, got {type(self.calibration).__name__}")
        if self.budget is not None:
            _real(self.budget, "budget", 0.0, 1.0, "(0, 1] (a fraction of dense FFN bytes read per token)",
                  low_open=True)
            self.calibration = dataclasses.replace(self.calibration, budget=float(self.budget))
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        _check(isinstance(self.skip, (tuple, list)) and all(isinstance(p, str) for p in self.skip),
               f"skip must be an FFN name or regex, or a list of them; got {self.skip!r}")
        self.skip = tuple(self.skip)
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"skip pattern {pattern!r} is not a valid regex: {exc}") from None
        if self.profile is not None and not hasattr(self.profile, "ffns"):
            _check(isinstance(self.profile, (str, os.PathLike)),
                   f"profile must be a Profile or the path of a saved one, got {type(self.profile).__name__}")
            from .profile import Profile  # a path: load it here so a bad path fails at compile time

            self.profile = Profile.load(self.profile)

    def guard_for(self, kind: str) -> str:
        """The guard an FFN of ``kind`` ("plain" or "gated") runs with.

        Example:
            >>> TardisOptions().guard_for("gated"), TardisOptions(guard="exact").guard_for("gated")
            ('int4', 'exact')
        """
        return self.guard if self.guard is not None else DEFAULT_GUARDS[kind]

    def skips(self, ffn_name: str) -> bool:
        """True if ``ffn_name`` is excluded by ``skip`` (exact name or full regex match)."""
        return any(p == ffn_name or re.fullmatch(p, ffn_name) for p in self.skip)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | "TardisOptions" | None) -> "TardisOptions":
        """Build from ``torch.compile``'s ``options`` dict; unknown keys get a did-you-mean error."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(f"tardis options must be a dict, got {type(options).__name__}")
        return cls(**_known_keys(cls, options, "tardis option"))


def _known_keys(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"unknown {what} {key!r}.{suggestion} Valid: {sorted(fields)}")
    return dict(data)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _integer(value: Any, name: str, minimum: int | None, note: str = "") -> None:
    """An int (not a bool, not a float) of at least ``minimum``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)
    bound = f" >= {minimum}" if minimum is not None else ""
    _check(ok, f"{name} must be an integer{bound}{' ' + note if note else ''}, got {value!r}")


def _real(value: Any, name: str, low: float, high: float, interval: str, low_open: bool = False,
          high_open: bool = False) -> None:
    """A number (not a bool, not a string) in the interval."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    _check(ok, f"{name} must be a number in {interval}, got {value!r}")
