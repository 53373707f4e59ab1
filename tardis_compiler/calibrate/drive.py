"""Drive: calibrate a model, from its batches to a ``Profile``.

``record`` runs the batches through the model under the recording backend (``record.py``) and
returns a ``Recorder`` (``record.py``) holding each FFN's input reservoir; ``Recorder.fit`` fits every FFN, with a
per-neuron mix under a budget (``allocate.py``) or the uniform coverage fit (``coverage.py``), as
often as you like over the same recorded tokens. ``calibrate`` and ``calibrate_for_budget`` do
both in one call.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable

import torch

from ..config import CalibrationConfig
from ..profile import Profile
from .loss_weights import output_gradients
from .record import Recorder, run_recording
from .sequential import fit_sequentially

log = logging.getLogger("tardis_compiler")


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
    run_recording(model, batches, recorder, "tardis: recording FFN inputs")
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
    source = f"calibrate(): {recorder.batches} batches"
    _measure_loss_weights(model, batches, recorder, recorder.config)
    if recorder.config.sequential > 1:
        return fit_sequentially(model, batches, recorder, recorder.config, None, source)
    return recorder.fit(source=source)


def calibrate_for_budget(model: torch.nn.Module, batches: Iterable[Any], budget: float, guard: str | None = None,
                         config: CalibrationConfig | None = None, recorder: Recorder | None = None) -> Profile:
    """Calibrate so the model's FFNs read at most ``budget`` of their dense bytes per token.

    Every FFN, plain or gated, meets it by a per-neuron mix (exact, guarded at some coverage,
    folded unguarded, dropped: ``allocate.py``) priced for ``guard`` (None: each FFN kind's
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
    source = f"calibrate_for_budget({budget}, {guard!r}): {recorder.batches} batches"
    _measure_loss_weights(model, batches, recorder, config)
    if config.sequential > 1:
        if batches is None:
            raise ValueError("sequential calibration (config.sequential > 1) runs the model again on the "
                             "calibration batches: pass them along with the recorder")
        profile = fit_sequentially(model, batches, recorder, config, guard, source)
    else:
        profile = recorder.fit(source, config, guard)
    over = [name for name, ffn in profile.ffns.items() if not ffn.stats["policy"]["within_budget"]]
    if over:
        raise ValueError(f"budget {budget} is below what tardis reads even with every neuron dropped (the output "
                         f"bias and the guard) for FFNs {over[:3]}: raise the budget")
    return profile


#: Calibration batches the loss weights are measured on (a forward and a backward pass each).
LOSS_BATCHES = 8


def _measure_loss_weights(model: torch.nn.Module, batches: Any, recorder: Recorder, config: CalibrationConfig) -> None:
    """With ``allocation="loss"``, measure the FFNs' loss weights once per recorder."""
    if config.allocation != "loss" or recorder.loss_weights is not None:
        return
    if batches is None:
        raise ValueError('allocation="loss" measures the loss on the calibration batches: pass them along '
                         "with the recorder")
    recorder.loss_weights = output_gradients(model, list(batches)[:LOSS_BATCHES])
