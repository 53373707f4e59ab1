"""The tardis rows of the evaluation: the backend at a given FFN bytes budget.

``tardis(model, batches, budget)`` calibrates once on the calibration batches so the FFNs read at
most ``budget`` of their dense bytes per token (``calibrate_for_budget``: a per-neuron mix per FFN),
and returns ``torch.compile(model, backend="tardis", ...)``. The model itself is untouched: the
compiled wrapper folds at run time. Bytes read are then *measured* on the evaluation text by
counting the guard's flags (``TardisMeter``), at batch-1 accounting.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from ..calibrate import calibrate_for_budget, record
from ..config import DEFAULT_GUARDS, CalibrationConfig
from ..profile import Profile
from ..accounting import ffn_bytes_per_token, mix_bytes_per_token
from ..runtime.stats import RuntimeStats, start_collecting, stop_collecting
from .accounting import FFNBytes, PreparedModel
from .errors import MethodNotApplicable
from .ffn import dense_ffn_bytes

#: The guard the eval uses: None is the backend's default per FFN kind (``DEFAULT_GUARDS``), the one
#: that measured best: int8 for plain FFNs (MiniLM), int4 for gated ones (SmolLM2).
EVAL_GUARD = None


class TardisMeter:
    """Bytes read per token on the evaluation text, from the flags the guard actually raised.

    Example:
        >>> prepared = tardis(model, batches, 0.5)         # its meter is a TardisMeter
        >>> prepared.meter.reset()
        >>> with torch.no_grad():                          # tardis folds for inference only
        ...     _ = prepared.model(batches[0])
        >>> 0 < prepared.meter.read_per_token() < prepared.ffn_bytes.dense
        True
    """

    def __init__(self, profile: Profile, guard: str | None, dense_weight_bytes: int) -> None:
        self.profile, self.guard, self.dense_weight_bytes = profile, guard, dense_weight_bytes
        self.stats: RuntimeStats | None = None

    def reset(self) -> None:
        if self.stats is not None:
            stop_collecting(self.stats)
        self.stats = RuntimeStats()
        start_collecting(self.stats)

    def read_per_token(self) -> float:
        if self.stats is None or not self.stats.ffns:
            raise RuntimeError("TardisMeter saw no tardis op call: was reset() called before running?")
        tardis = dense = 0.0
        for name, ffn in self.profile.ffns.items():
            counters = self.stats.ffns.get(name)
            guard = _guard_of(ffn, self.guard)
            measured = ffn.stats["guards"][guard]
            if ffn.has_policy:  # flags count the always-exact neurons too: corrected per token
                rate = counters.flag_rate if counters is not None else measured["corrected_rate"]
                tardis += mix_bytes_per_token(measured, rate * ffn.d_hidden)
                dense += ffn.stats["dense_bytes"]
                continue
            rate = counters.flag_rate if counters is not None else measured["flag_rate"]
            guard_bytes = measured.get("bytes", 0)
            args = (ffn.d_in, ffn.d_hidden, ffn.d_out, ffn.stats["elem_bytes"], ffn.stats["has_bias"])
            tardis += ffn_bytes_per_token(*args, guard, rate, guard_bytes)
            dense += ffn_bytes_per_token(*args)
        stop_collecting(self.stats)
        self.stats = None
        # Same denominator as the other methods (weights only): scale by the fraction.
        return tardis / dense * self.dense_weight_bytes


def tardis(model: torch.nn.Module, batches: Iterable[Any], budget: float, guard: str | None = EVAL_GUARD) -> PreparedModel:
    """The tardis backend at ``budget`` of dense FFN bytes read per token.

    Example:
        >>> prepared = tardis(model, batches, 0.5)
        >>> prepared.ffn_bytes.read_fraction <= 0.5 + 0.01
        True
    """
    config = CalibrationConfig(progress=False)
    try:
        profile = calibrate_for_budget(model, batches, budget, guard, config,
                                       recorder=_recorder(model, batches, config))
    except ValueError as exc:
        if "found no FFN" in str(exc):
            raise MethodNotApplicable("tardis found no FFN it can fold in this model") from exc
        if "budget" in str(exc):
            raise MethodNotApplicable(str(exc)) from exc
        raise
    torch.compiler.reset()
    # inner="eager": the rest of the graph runs as the baselines do (eagerly), and no inductor
    # compile is paid per budget; accuracy and bytes are the same (guard="all" is tested equal).
    compiled = torch.compile(model, backend="tardis", options={"profile": profile, "guard": guard, "inner": "eager",
                                                                     "dense_above": None})
    dense_bytes = dense_ffn_bytes(model)
    read = profile.bytes_fraction(guard) * dense_bytes
    resident = dense_bytes + _added_resident(profile, guard)
    guards = {n: _guard_of(f, guard) for n, f in profile.ffns.items()}
    details = {"method": "tardis", "guard": sorted(set(guards.values())),
               "budget": budget,
               "policy": {n: f.stats["policy"]["counts"] for n, f in profile.ffns.items() if f.has_policy},
               "calibration_tokens": profile.tokens,
               "flag_rate": {n: f.stats["guards"][guards[n]]["flag_rate"] for n, f in profile.ffns.items()},
               "recall": {n: f.stats["guards"][guards[n]]["recall"] for n, f in profile.ffns.items()}}
    return PreparedModel(compiled, FFNBytes(read, resident, dense_bytes),
                         meter=TardisMeter(profile, guard, dense_bytes), details=details)


# One recording per (model, calibration batches): every budget of a run fits from it (and, for
# gated FFNs, from the per-neuron options prepared once). Holds the last pair only.
_LAST_RECORDING: list = []


def _recorder(model: torch.nn.Module, batches, config: CalibrationConfig):
    if _LAST_RECORDING and _LAST_RECORDING[0] is model and _LAST_RECORDING[1] is batches:
        return _LAST_RECORDING[2]
    recorder = record(model, batches, config)
    _LAST_RECORDING[:] = [model, batches, recorder]
    return recorder


def _guard_of(ffn, guard: str | None) -> str:
    return guard or DEFAULT_GUARDS[ffn.kind]


def _added_resident(profile: Profile, guard: str | None) -> int:
    """Bytes the packs hold on top of the model's own weights (the backend never changes those)."""
    group = profile.config.group_size
    return sum(ffn.layout(_guard_of(ffn, guard), torch.float32 if ffn.stats["elem_bytes"] == 4 else torch.bfloat16,
                          group).resident_bytes() for ffn in profile.ffns.values())
