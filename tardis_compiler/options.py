"""Validated options of the ``"tardis"`` backend: ``torch.compile(model, backend="tardis", options=...)``.

``TardisOptions`` validates in ``__post_init__``; a profile given as a path is loaded there, so a
bad path fails when the backend first compiles a graph (and in ``explain``), before any work.
Kept apart from ``config.py`` because it holds a ``Profile``, and the profile module itself needs
the calibration config.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from .config import (DEFAULT_GUARDS, GUARDS, CalibrationConfig, check_patterns, known_keys, name_matches, require,
                     require_integer, require_number)
from .profile import Profile

INNER_COMPILERS = ("inductor", "eager")


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
            in runtime/ffn_op.py, per dtype and compute threads: with 2 threads 4 tokens in bfloat16,
            16 otherwise; with 1 thread 1 and 4); an int; or None, never
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
        require(self.guard is None or (isinstance(self.guard, str) and self.guard in GUARDS),
                f"guard must be one of {GUARDS} or None, got {self.guard!r}")
        require(isinstance(self.inner, str) and self.inner in INNER_COMPILERS,
                f"inner must be one of {INNER_COMPILERS}, got {self.inner!r}")
        require_integer(self.calibration_calls, "calibration_calls", 1)
        if self.dense_above is not None and self.dense_above != "auto":
            require_integer(self.dense_above, "dense_above", 0, "(or 'auto', or None for never)")
        if isinstance(self.calibration, Mapping):
            self.calibration = CalibrationConfig.from_dict(self.calibration)
        require(isinstance(self.calibration, CalibrationConfig), "calibration must be a CalibrationConfig or a dict "
                f"of its fields, got {type(self.calibration).__name__}")
        if self.budget is not None:
            require_number(self.budget, "budget", 0.0, 1.0, "(0, 1] (a fraction of dense FFN bytes read per token)",
                           low_open=True)
            self.calibration = dataclasses.replace(self.calibration, budget=float(self.budget))
        self.skip = check_patterns(self.skip, "skip")
        if self.profile is not None and not hasattr(self.profile, "ffns"):
            require(isinstance(self.profile, (str, os.PathLike)),
                    f"profile must be a Profile or the path of a saved one, got {type(self.profile).__name__}")
            self.profile = Profile.load(self.profile)  # here, so a bad path fails at compile time

    def guard_for(self, kind: str) -> str:
        """The guard an FFN of ``kind`` ("plain" or "gated") runs with.

        Example:
            >>> TardisOptions().guard_for("gated"), TardisOptions(guard="exact").guard_for("gated")
            ('int4', 'exact')
        """
        return self.guard if self.guard is not None else DEFAULT_GUARDS[kind]

    def skips(self, ffn_name: str) -> str | None:
        """Why ``ffn_name`` stays dense, if it does: ``skip`` here, or the calibration's (the
        auto-calibration config's, or the profile's), by exact name or full regex match."""
        if name_matches(ffn_name, self.skip):
            return "excluded by options['skip']"
        calibration = self.profile.config if self.profile is not None else self.calibration
        if calibration.skips(ffn_name):
            return "excluded by the calibration's skip"
        return None

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | "TardisOptions" | None) -> "TardisOptions":
        """Build from ``torch.compile``'s ``options`` dict; unknown keys get a did-you-mean error."""
        if options is None:
            return cls()
        if isinstance(options, cls):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(f"tardis options must be a dict, got {type(options).__name__}")
        return cls(**known_keys(cls, options, "tardis option"))
