"""Validated configuration: the guards, and what calibration fits (``CalibrationConfig``).

``CalibrationConfig`` validates in ``__post_init__`` and round-trips through plain dicts (JSON), so
a profile records the exact config it was calibrated with. The backend's options, which may hold
a profile, are ``options.TardisOptions``; the validation helpers at the end serve both.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any, Mapping

from .runtime.ffn_kind import KINDS

#: Guards: a low-bit copy of W1 predicts z (int2/int4/int8); "svd" a whitened rank-r factorisation
#: of W1 fitted to the calibration inputs (SVDP; only with a per-neuron mix, i.e. a budget); "exact"
#: computes z in full (slow, for testing); "all" flags every neuron, which must reproduce the dense
#: model (exactness invariant).
LOW_BIT_GUARDS = {"int2": 2, "int4": 4, "int8": 8}
PREDICTOR_GUARDS = (*LOW_BIT_GUARDS, "svd")  # guards that predict z and carry calibrated margins
GUARDS = (*PREDICTOR_GUARDS, "exact", "all")
#: The guard each FFN kind gets when none is given (``FFNKind.default_guard``, runtime/ffn_kind.py).
DEFAULT_GUARDS = {name: kind.default_guard for name, kind in KINDS.items()}
#: The budget calibration fits when none is given (``torch.compile(model, backend="tardis")`` with no
#: options, ``calibrate(model, batches)``): half the dense FFN bytes read per token, where the measured
#: trade-off turns (docs/RESULTS.md): MiniLM keeps cosine 0.995 at 0.5 (0.93 at 0.3), SmolLM2 +8% PPL
#: at 0.5 (+50% at 0.3), and the bytes saved are time at 0.5 on both.
DEFAULT_BUDGET = 0.5


@dataclasses.dataclass
class CalibrationConfig:
    r"""How calibration picks each neuron's range and line, and sizes the guard's margin.

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
        budget: FFN weight bytes read per token, as a fraction of the dense FFN's, in (0, 1];
            default ``DEFAULT_BUDGET`` (0.5). Every FFN chooses each neuron's option (exact, guarded
            at some coverage, folded, dropped) to fit it with the least calibration error. None:
            the uniform coverage fit, where plain FFNs use ``coverage`` for every neuron (ranges with
            a worst-case error bound); gated FFNs, which have no such fit, still get the default budget.
        allocation: how FFNs fitted to a budget share it: "layer" (each meets it), "model" (bytes
            go to the FFNs whose relative error they cut most; the model as a whole meets it) or
            "loss" (the model as a whole meets it, each neuron's error weighted by the loss's
            sensitivity to it, measured by one backward pass: ``calibrate/loss_weights.py``).
        resident: FFN bytes a compressed model holds (``compress_``), as a fraction of the dense
            FFN's weight bytes, or None (default): not capped. Only the neurons that can take the
            exact path (exact, guarded) keep their weights, so memory is a second knapsack
            constraint beside ``budget``: fewer guarded neurons, more folded or dropped ones.
        bundles: how the guarded neurons' rows (their bundles) are stored: "int8" (default; one
            scale per row and column: a quarter of float32's bytes read and held, half of
            bfloat16's, so a budget affords more guarded neurons) or "dense" (the model's dtype:
            the exact path is exact). Always-exact neurons stay dense either way, and ``guard="all"``
            keeps every row as it is (the exactness check).
        weights: None (default): packs hold the model's weights (int8 bundles as ``bundles`` says);
            "int8": quantized packs, every weight int8 (Wf, the always-exact and the guarded
            neurons' bundles; ``runtime/quantize.py``); "int4": every weight int4, in groups of 32
            along each row with a bf16 scale and minimum per group (about 0.31 of bfloat16's
            bytes). The model a quantized pack is exact against, and that calibration fits and
            prices against, is then the dense model with the same quantized FFN weights, and
            ``budget`` is a fraction of *its* FFN bytes: tardis over int8 / int4. Needs
            ``bundles="int8"`` (the request for quantized bundles). The "exact" guard then reads
            each guarded neuron's quantized first row: with int4 weights about the bytes of an
            int4 guard, and no prediction error.
        fold: with a budget, whether the mix may fold neurons into the matrix ``Wf``: None (default)
            takes whichever of the two variants has less error per FFN, False never folds (neurons
            off the exact path contribute nothing: contextual activation sparsity, c = 0), True always.
        fold_fit: how neurons folded without a guard enter ``Wf``: "lstsq" (one least-squares map of
            x for their total contribution, ``calibrate/lstsq_fold.py``) or "lines" (each neuron's own
            line or constant).
        skip: FFN names or regexes (full match, e.g. ``r"model\.layers\.(0|29)\.mlp"``) to leave dense:
            not recorded, not fitted; the backend and ``compress_`` leave them as they are.
        budgets: per-FFN budgets, FFN name or regex -> budget (the first that matches), over
            ``budget`` for the rest (e.g. a higher budget for the first layers). Needs
            ``allocation="layer"``: the shared allocations choose each FFN's share themselves.
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
    budget: float | None = DEFAULT_BUDGET
    allocation: str = "layer"
    resident: float | None = None
    bundles: str = "int8"
    weights: str | None = None
    fold: bool | None = None
    fold_fit: str = "lstsq"
    sequential: int = 1
    skip: tuple[str, ...] = ()
    budgets: dict[str, float] = dataclasses.field(default_factory=dict)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        require_number(self.coverage, "coverage", 0.0, 1.0, "(0, 1]", low_open=True)
        require_integer(self.max_tokens, "max_tokens", 16)
        require_number(self.holdout_fraction, "holdout_fraction", 0.0, 0.9, "[0, 0.9)", high_open=True)
        require_number(self.target_recall, "target_recall", 0.0, 1.0, "(0, 1]", low_open=True)
        require_integer(self.group_size, "group_size", 8)
        require(self.group_size % 8 == 0, f"group_size must be a positive multiple of 8, got {self.group_size}")
        require_integer(self.svd_rank, "svd_rank", 0, "(0: a quarter of d_in)")
        require(self.allocation in ("layer", "model", "loss"),
                f"allocation must be 'layer', 'model' or 'loss', got {self.allocation!r}")
        require(self.bundles in ("int8", "dense"), f"bundles must be 'int8' or 'dense', got {self.bundles!r}")
        require(self.weights in (None, "int8", "int4"), f"weights must be None, 'int8' or 'int4', got {self.weights!r}")
        require(self.weights is None or self.bundles == "int8",
                f"weights={self.weights!r} holds every bundle quantized: bundles must be 'int8', got {self.bundles!r}")
        require(self.fold is None or isinstance(self.fold, bool),
                f"fold must be None, True or False, got {self.fold!r}")
        require(self.fold_fit in ("lstsq", "lines"), f"fold_fit must be 'lstsq' or 'lines', got {self.fold_fit!r}")
        require_integer(self.sequential, "sequential", 1, "(groups of FFNs fitted in turn; 1: all at once)")
        if self.budget is not None:
            require_number(self.budget, "budget", 0.0, 1.0, "(0, 1] (a fraction of dense FFN bytes read per token)",
                           low_open=True)
        if self.resident is not None:
            require_number(self.resident, "resident", 0.0, math.inf, "(0, inf) (a fraction of dense FFN weight bytes held)",
                           low_open=True)
        self.skip = check_patterns(self.skip, "skip")
        require(isinstance(self.budgets, Mapping), f"budgets must map FFN names or regexes to budgets, got "
                f"{type(self.budgets).__name__}")
        self.budgets = dict(self.budgets)
        check_patterns(tuple(self.budgets), "budgets")
        for pattern, value in self.budgets.items():
            require_number(value, f"budgets[{pattern!r}]", 0.0, 1.0, "(0, 1]", low_open=True)
        require(not self.budgets or self.allocation == "layer", "per-FFN budgets (budgets=) need "
                f"allocation='layer', got {self.allocation!r}: the shared allocations choose each FFN's share")
        require_integer(self.seed, "seed", None)
        require(isinstance(self.progress, bool), f"progress must be True or False, got {self.progress!r}")

    def skips(self, ffn_name: str) -> bool:
        r"""Whether ``skip`` leaves ``ffn_name`` dense.

        Example:
            >>> CalibrationConfig(skip=[r"layers\.0\..*"]).skips("layers.0.mlp")
            True
        """
        return name_matches(ffn_name, self.skip)

    def budget_for(self, ffn_name: str) -> float | None:
        r"""``ffn_name``'s budget: the first matching ``budgets`` entry, else ``budget``.

        Example:
            >>> CalibrationConfig(budgets={r"layers\.0\..*": 0.9}).budget_for("layers.0.mlp")
            0.9
        """
        return next((b for p, b in self.budgets.items() if name_matches(ffn_name, (p,))), self.budget)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON. Example: ``CalibrationConfig().to_dict()["coverage"]``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CalibrationConfig":
        """Inverse of ``to_dict``; unknown keys are an error naming the valid ones."""
        return cls(**known_keys(cls, data, "calibration config"))


def known_keys(cls: type, data: Mapping[str, Any], what: str) -> dict[str, Any]:
    """``data`` as a dict, if every key is a field of the dataclass ``cls``; else a ValueError
    naming the closest field and the valid ones.

    Example:
        >>> known_keys(CalibrationConfig, {"coverag": 0.8}, "calibration config")   # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown calibration config 'coverag'. Did you mean 'coverage'? Valid: [...]
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            hint = difflib.get_close_matches(key, fields, n=1)
            suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"unknown {what} {key!r}.{suggestion} Valid: {sorted(fields)}")
    return dict(data)


def name_matches(name: str, patterns: tuple[str, ...]) -> bool:
    r"""Whether an FFN name is one of ``patterns``, exactly or as a full regex match: the one rule
    behind every ``skip`` and per-FFN override.

    Example:
        >>> name_matches("model.layers.3.mlp", (r"model\.layers\.[0-3]\.mlp",))
        True
    """
    return any(p == name or re.fullmatch(p, name) for p in patterns)


def check_patterns(patterns: Any, name: str) -> tuple[str, ...]:
    """``patterns`` (one string or a list) as a tuple of valid regexes, else a ValueError.

    Example:
        >>> check_patterns("a.b", "skip")
        ('a.b',)
    """
    if isinstance(patterns, str):
        patterns = (patterns,)
    require(isinstance(patterns, (tuple, list)) and all(isinstance(p, str) for p in patterns),
            f"{name} must be an FFN name or regex, or a list of them; got {patterns!r}")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{name} pattern {pattern!r} is not a valid regex: {exc}") from None
    return tuple(patterns)


def require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``: validation reads as the rule it checks.

    Example:
        >>> require(8 % 8 == 0, "group_size must be a multiple of 8")
    """
    if not ok:
        raise ValueError(message)


def require_integer(value: Any, name: str, minimum: int | None, note: str = "") -> None:
    """An int (not a bool, not a float) of at least ``minimum``, else a ValueError naming ``name``.

    Example:
        >>> require_integer(True, "seed", None)
        Traceback (most recent call last):
        ...
        ValueError: seed must be an integer, got True
    """
    ok = isinstance(value, int) and not isinstance(value, bool) and (minimum is None or value >= minimum)
    bound = f" >= {minimum}" if minimum is not None else ""
    require(ok, f"{name} must be an integer{bound}{' ' + note if note else ''}, got {value!r}")


def require_number(value: Any, name: str, low: float, high: float, interval: str, low_open: bool = False,
                   high_open: bool = False) -> None:
    """A number (not a bool, not a string) in the interval, else a ValueError naming ``name``.

    Example:
        >>> require_number(1.5, "coverage", 0.0, 1.0, "(0, 1]", low_open=True)
        Traceback (most recent call last):
        ...
        ValueError: coverage must be a number in (0, 1], got 1.5
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    require(ok, f"{name} must be a number in {interval}, got {value!r}")
