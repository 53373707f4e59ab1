"""Sequential calibration: each group of FFNs fitted to the inputs it will really see.

Calibrating every FFN on the dense model's activations ignores that, once compressed, the FFNs
before it change what it sees, and that errors compound through the layers. Here (as SparseGPT's
and Wanda's sequential modes do) the FFNs are fitted in ``config.sequential`` groups, in graph
order. The first group fits on the first recording (the dense model); each later pass re-runs the
calibration batches with every FFN already fitted running through the op, and records the inputs
of the next group only. The FFNs not yet fitted run exactly (stand-in calibrations that keep every
neuron exact), and each pass stops the model right after the last input it needs
(``record.EnoughRecorded``), so the passes cost about ``groups / 2`` forward passes in all; memory
holds one group's tokens at a time beyond the first recording.

Sequential calibration needs the model and its batches (``calibrate``, ``calibrate_for_budget``);
auto-calibration inside the backend, which sees only the calls it is given, fits non-sequentially.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..config import DEFAULT_GUARDS, PREDICTOR_GUARDS, CalibrationConfig
from ..profile import FFNProfile, Profile
from .record import FFNRecord, run_recording

if TYPE_CHECKING:
    from .record import Recorder


def fit_sequentially(model: torch.nn.Module, batches: Sequence[Any], first: "Recorder", config: CalibrationConfig,
                     guard: str | None, source: str) -> Profile:
    """Fit ``first``'s FFNs (recorded on the dense model) in ``config.sequential`` groups, each
    on inputs recorded with the groups before it compressed (module docstring).

    Example:
        >>> import torch, tardis_compiler as tc
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16),
        ...                           torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
        >>> cfg = tc.CalibrationConfig(progress=False, sequential=2)
        >>> profile = tc.calibrate_for_budget(mlp, [torch.randn(128, 16) for _ in range(2)], 0.6, "int8", cfg)
        >>> len(profile.ffns), profile.source.endswith("2 sequential groups")
        (2, True)
    """
    names = list(first.ffns)
    guards = {kind: guard or default for kind, default in DEFAULT_GUARDS.items()}
    stand_ins = {name: exact_stand_in(first.ffns[name]) for name in names}
    fitted: dict[str, FFNProfile] = {}
    groups = split_groups(names, config.sequential)
    for i, group in enumerate(groups):
        if i == 0:
            recorder = first.subset(group)
        else:
            prefix = Profile(ffns={n: fitted.get(n, stand_ins[n]) for n in names}, config=config, tokens=0,
                             source="sequential calibration: the groups fitted so far")
            recorder = first.spawn(set(group), prefix, guards, stop_after=group[-1])
            run_recording(model, batches, recorder, f"tardis: recording FFN group {i + 1}/{len(groups)}")
        fitted.update(recorder.fit(source, config, guard).ffns)
    tokens = max(r.seen for r in first.ffns.values())
    return Profile(ffns={n: fitted[n] for n in names}, config=config, tokens=tokens,
                   source=f"{source}, {len(groups)} sequential groups")


def split_groups(names: list[str], groups: int) -> list[list[str]]:
    """``names`` in at most ``groups`` contiguous groups of near-equal size.

    Example:
        >>> split_groups(list("abcde"), 2)
        [['a', 'b', 'c'], ['d', 'e']]
    """
    size = math.ceil(len(names) / max(1, min(groups, len(names))))
    return [names[i:i + size] for i in range(0, len(names), size)]


def exact_stand_in(record: FFNRecord) -> FFNProfile:
    """A calibration of ``record``'s FFN that keeps every neuron exact (the op then computes the
    dense FFN): what the FFNs not yet fitted run with during a sequential pass."""
    w = record.weights
    first = w[record.kind.first_row]
    m, d_in = first.shape
    d_out = w[record.kind.out_row].shape[1]
    zeros, inf = torch.zeros(m), torch.full((m,), math.inf)
    return FFNProfile(
        name=record.name, pattern=record.pattern, activation=record.activation, d_in=d_in, d_hidden=m, d_out=d_out,
        slope=zeros, intercept=zeros, lower=inf, upper=-inf, line_error=zeros,
        margins={g: zeros for g in PREDICTOR_GUARDS}, stats={"stand_in": True},
        kind=record.kind.name, predictor=torch.zeros(1, m + d_in))
