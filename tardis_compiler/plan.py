"""The per-FFN plan: what happens to each FFN found, decided in one place for every front door.

The backend's graph rewrite (``backend.py``), ``compress_``'s module swap (``compress.py``) and the
loaders of what they write ask this module, per FFN, whether it is rewritten or stays dense and
why, which guard its pack runs and how the pack holds its rows; ``FFNPlan.build`` makes the pack
(``runtime/pack.build_pack``) and ``FFNPlan.row`` the FFN's line of the explain report.

A plan is made in two steps, because the backend decides what to rewrite before calibration has
run (it auto-calibrates on the first calls): ``plan_ffn`` from the match and the user's request,
then ``FFNPlan.calibrated`` once the FFN's calibration is known.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .accounting import dense_ffn_bytes
from .config import DEFAULT_GUARDS, CalibrationConfig, name_matches
from .profile import FFNProfile
from .report import FFNReport
from .runtime.ffn_kind import ffn_kind
from .runtime.pack import FFNPack, build_pack

#: The front doors a plan is made for. The graph rewrite packs every call of an FFN on its own
#: (weights tied between layers are fine there); a module swap holds one pack per module.
DOORS = ("graph", "module")


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    """What the user asked of every FFN, whatever the door.

    Args:
        guard: the guard to run (None: each kind's default, ``DEFAULT_GUARDS``).
        skip: FFN names or regexes to leave dense (already checked: ``config.check_patterns``).
        calibration: the calibration config whose ``skip`` also applies (the profile's, or the
            auto-calibration's); its ``group_size`` is the guard's.
        bundles: how the guarded neurons' rows are held ("int8" or "dense"); None: as calibration priced them.
        door: "graph" or "module" (``DOORS``).

    Example:
        >>> PlanRequest(guard="int4", door="module").guard_for("plain")
        'int4'
    """

    guard: str | None = None
    skip: tuple[str, ...] = ()
    calibration: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    bundles: str | None = None
    door: str = "graph"

    def __post_init__(self) -> None:
        if self.door not in DOORS:
            raise ValueError(f"door must be one of {DOORS}, got {self.door!r}")

    def guard_for(self, kind: str) -> str:
        """The guard an FFN of ``kind`` runs with."""
        return self.guard if self.guard is not None else DEFAULT_GUARDS[kind]


@dataclasses.dataclass(frozen=True)
class FFNPlan:
    """What happens to one FFN: ``status`` "rewrite" or "dense" (with ``reason``), its guard, how
    its pack holds its rows, and (once known) its calibration.

    Example:
        >>> import torch
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> from tardis_compiler.compress import model_ffns
        >>> (match, _, _), = model_ffns(mlp.eval(), torch.randn(2, 8))
        >>> plan_ffn(match, PlanRequest()).status, plan_ffn(match, PlanRequest(guard="int4")).guard
        ('rewrite', 'int4')
        >>> plan = plan_ffn(match, PlanRequest(skip=(".*",)))   # names or full-match regexes
        >>> plan.status, plan.reason
        ('dense', 'excluded by skip')
    """

    name: str
    kind: str
    activation: str
    pattern: str
    d_in: int
    d_hidden: int
    d_out: int
    guard: str
    status: str = "rewrite"
    reason: str = ""
    bundles: str | None = None  # None: what calibration priced (``FFNProfile.bundles``)
    group_size: int = 64
    calibration: FFNProfile | None = None

    @property
    def rewritten(self) -> bool:
        return self.status == "rewrite"

    def signature(self) -> tuple[int, int, int, str, str]:
        """What must match the FFN's calibration (``FFNProfile.signature``)."""
        return (self.d_in, self.d_hidden, self.d_out, self.activation, self.kind)

    def dense(self, reason: str) -> "FFNPlan":
        """This plan, left dense for ``reason``."""
        return dataclasses.replace(self, status="dense", reason=reason)

    def calibrated(self, ffn: FFNProfile | None) -> "FFNPlan":
        """This plan with the FFN's calibration ``ffn`` (None: the profile has none): dense when
        it is missing, was fitted to other shapes, or cannot run the guard.

        Example:
            >>> # plans = [plan.calibrated(profile.ffns.get(plan.name)) for plan in plans]
        """
        if not self.rewritten:
            return self
        if ffn is None:
            return self.dense("not in the profile")
        if ffn.signature() != self.signature():
            return self.dense(f"profile has {ffn.signature()}, model {self.signature()}")
        if self.guard == "svd" and ffn.predictor is None:
            return self.dense("guard 'svd' needs a profile calibrated for it (calibrate with guard='svd' and a budget)")
        return dataclasses.replace(self, calibration=ffn, bundles=self.bundles or ffn.bundles)

    def build(self, weights: dict[str, torch.Tensor | None]) -> FFNPack:
        """The FFN's pack from its neuron-major ``weights`` (``FFNSlots.weights``), which are only read."""
        ffn = self._require_calibration()
        with torch.no_grad():
            return build_pack(self.kind, weights, ffn.params(self.guard), self.guard, self.activation,
                              self.group_size, ffn.fold_term, bundles=self.bundles or ffn.bundles,
                              weights_encoding=ffn.weights)

    def row(self, weights: dict[str, torch.Tensor | None]) -> FFNReport:
        """The FFN's line of the explain report: shapes and dense bytes from its ``weights``; once
        calibrated, what calibration measured for its guard and what its pack holds and reads."""
        spec = ffn_kind(self.kind)
        first = weights[spec.first_row]
        biases = [weights[b] is not None for b in spec.biases]
        status = {"rewrite": "rewritten"}.get(self.status, self.status)
        row = FFNReport(self.name, self.pattern, self.activation, status, self.reason, d_in=self.d_in,
                        d_hidden=self.d_hidden, d_out=self.d_out, kind=self.kind)
        row.elem_bytes, row.has_bias, row.dtype = first.element_size(), any(biases), str(first.dtype).removeprefix("torch.")
        row.bytes_dense = dense_ffn_bytes(spec, self.d_in, self.d_hidden, self.d_out, row.elem_bytes,
                                          any(biases[:-1]), biases[-1])
        row.resident_dense = row.bytes_dense
        if self.calibration is not None and self.rewritten:
            self.fill(row)
        return row

    def measured(self) -> dict[str, Any]:
        """Calibration's held-out measurements for this plan's guard: flag rate, recall, relative
        error, coverage and the neuron mix ({} before calibration)."""
        ffn = self.calibration
        if ffn is None:
            return {}
        held_out = ffn.stats.get("guards", {}).get(self.guard, {})
        out = {key: held_out[key] for key in ("flag_rate", "recall", "rel_error") if key in held_out}
        if self.guard == "all":
            out = {"flag_rate": 1.0, "recall": 1.0, "rel_error": 0.0}
        out["coverage"] = ffn.stats.get("coverage")
        out["policy"] = ffn.stats.get("policy", {}).get("counts")
        return out

    def read_bytes(self, elem_bytes: int, has_bias: bool, dense_bytes: float) -> float:
        """Weight bytes the pack reads per token at batch 1, at the flag rate calibration measured;
        ``dense_bytes`` with ``guard="all"`` (every neuron exact reads the dense FFN)."""
        if self.guard == "all":
            return float(dense_bytes)
        return self._require_calibration().bytes_per_token(self.guard, elem_bytes, has_bias, bundles=self.bundles)

    def fill(self, row: FFNReport) -> None:
        """Write into ``row`` (this FFN's, from ``row``) what calibration measured and what the
        pack holds and reads: the backend fills its rows so once auto-calibration has run."""
        ffn = self._require_calibration()
        row.status, row.reason = "rewritten", ""
        measured = self.measured()
        row.coverage = measured.get("coverage")
        row.error_bound = ffn.stats.get("error_bound")
        row.policy = measured.get("policy") if ffn.has_policy else None
        if "flag_rate" in measured:
            row.flag_rate, row.recall, row.rel_error = (measured.get(k) for k in ("flag_rate", "recall", "rel_error"))
            row.guard_kernel = ffn.stats.get("guards", {}).get(self.guard, {}).get("kernel", self.guard)
        layout = ffn.layout(self.guard, getattr(torch, row.dtype), self.group_size, self.bundles)
        # The graph rewrite leaves the model its weights (the pack comes on top); a module swap
        # replaces them by the pack (``compress_``'s report says what it holds).
        row.resident_tardis = row.resident_dense + layout.resident_bytes()
        row.bytes_tardis = self.read_bytes(row.elem_bytes, row.has_bias, row.bytes_dense)

    def _require_calibration(self) -> FFNProfile:
        if self.calibration is None:
            raise ValueError(f"FFN {self.name!r} has no calibration yet: plan.calibrated(profile.ffns[name]) first")
        return self.calibration


def plan_ffn(match: Any, request: PlanRequest) -> FFNPlan:
    """The plan of one matched FFN (``passes.find_ffns``) for ``request``, before calibration:
    "rewrite", or "dense" with the reason (skipped, or a shape this door cannot run).

    Example:
        >>> # plans = [plan_ffn(m, PlanRequest(guard=None, door="graph")) for m in find_ffns(gm, fqns)[0]]
    """
    spec = ffn_kind(match.kind)
    plan = FFNPlan(match.name, spec.name, match.activation.name, match.pattern, match.d_in, match.d_hidden,
                   match.d_out, guard=request.guard_for(spec.name), bundles=request.bundles,
                   group_size=request.calibration.group_size)
    if name_matches(match.name, request.skip):
        return plan.dense("excluded by skip")
    if request.calibration.skips(match.name):
        return plan.dense("excluded by the calibration's skip")
    if spec.n_inputs > 1 and any(linear.layout != "out_in" for linear in match.linears):
        return plan.dense(f"{spec.name} FFN with a transposed (x @ W) weight: only nn.Linear layouts")
    if request.door == "module" and "#" in match.name:
        return plan.dense("weights shared with another FFN: a module swap holds one pack per module "
                          "(torch.compile(backend='tardis') rewrites each call instead)")
    return plan
