"""Drive: calibrate a model, from its batches to a ``Profile``.

``record`` runs the batches through the model under the recording backend (``record.py``) and
returns a ``Recorder`` holding each FFN's input reservoir; ``Recorder.fit`` fits every FFN, with a
per-neuron mix under a budget (``allocate.py``) or the uniform coverage fit (``coverage.py``), as
often as you like over the same recorded tokens. ``calibrate`` and ``calibrate_for_budget`` do
both in one call.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any, Iterable

import torch

from ..config import DEFAULT_GUARDS, CalibrationConfig
from ..profile import Profile
from .allocate import fit_policy_ffns
from .coverage import fit_ffn
from .loss_weights import OutputGradients, output_gradients
from .record import FFNRecord, run_recording
from .sequential import fit_sequentially

log = logging.getLogger("tardis_compiler")
_FEW_TOKENS = 64  # below this, calibration warns that its fit will not generalise


class Recorder:
    """Collects ``FFNRecord``s while a recording graph runs (see ``recording``)."""

    def __init__(self, config: CalibrationConfig, only: set[str] | None = None, prefix: Profile | None = None,
                 guards: dict[str, str] | None = None, stop_after: str | None = None) -> None:
        self.config = config
        self.ffns: dict[str, FFNRecord] = {}
        # Gated FFNs' per-neuron options do not depend on the budget: computed once per guard and
        # config, and reused by every budget or allocation fitted from this recorder.
        self.prepared: dict = {}
        # Sequential calibration (sequential.py): record only the FFNs ``only``, with the FFNs of
        # ``prefix`` folded (priced for ``guards`` per kind), stopping after ``stop_after``.
        self.only, self.prefix, self.stop_after = only, prefix, stop_after
        self.guards = guards or dict(DEFAULT_GUARDS)
        self.loss_weights: OutputGradients | None = None  # allocation="loss" (measured by ``calibrate*``)

    def register(self, name: str, pattern: str, activation: str, weights: dict) -> None:
        """Declare an FFN, or hand it its weights again (each call of a recording graph does)."""
        if (self.only is not None and name not in self.only) or self.config.skips(name):
            return
        if name not in self.ffns:
            seed = self.config.seed + len(self.ffns)
            self.ffns[name] = FFNRecord(name, pattern, activation, weights, self.config.max_tokens, seed)
        else:
            self.ffns[name].weights = weights

    def spawn(self, only: set[str], prefix: Profile, guards: dict[str, str], stop_after: str) -> "Recorder":
        """A new recorder with this one's config, for one pass of sequential calibration."""
        spawned = Recorder(self.config, only=only, prefix=prefix, guards=guards, stop_after=stop_after)
        spawned.loss_weights = self.loss_weights
        return spawned

    def subset(self, names: list[str]) -> "Recorder":
        """A recorder over some of this one's records (shared, not copied) and its prepared options."""
        part = Recorder(self.config)
        part.ffns = {n: self.ffns[n] for n in names}
        part.prepared = self.prepared
        part.batches = getattr(self, "batches", 0)
        part.loss_weights = self.loss_weights
        return part

    def release_weights(self) -> None:
        """Let go of the FFNs' weights until the next ``register`` (an auto-calibration waiting for
        its next call must not keep a deleted model alive)."""
        for record in self.ffns.values():
            record.weights = None

    def fit(self, source: str, config: CalibrationConfig | None = None, guard: str | None = None) -> Profile:
        """Fit every recorded FFN (``coverage.py``, ``allocate.py``) into a ``Profile``; ``config``
        overrides the recorder's (e.g. another coverage or budget over the same recorded tokens).

        With ``config.budget`` set, every FFN gets a per-neuron mix within it (``allocate.py``),
        priced for ``guard`` (None: each kind's default, ``DEFAULT_GUARDS``). Without one, gated
        FFNs (and every FFN with ``guard="svd"``) get that mix at 0.5 of dense, and plain FFNs the
        coverage fit of ``coverage.fit_ffn``, for every low-bit guard at once."""
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
        mix_all = config.budget is not None or bool(config.budgets) or guard == "svd"  # the svd guard's factors come with a mix
        by_policy = [r for r in self.ffns.values() if r.gated or mix_all]
        by_coverage = [r for r in self.ffns.values() if r not in by_policy]
        ffns = {r.name: fit_ffn(r, config) for r in _progress(by_coverage, config, "tardis: fitting FFN ranges")}
        if by_policy:  # fitted together: with allocation="model" they share one budget
            guards = {kind: guard or default for kind, default in DEFAULT_GUARDS.items()}
            ffns.update(fit_policy_ffns(_progress(by_policy, config, "tardis: fitting per-neuron mixes"), config,
                                        guards, self.prepared, self.loss_weights))
        ffns = {name: ffns[name] for name in self.ffns}  # graph order
        tokens = max(r.seen for r in self.ffns.values())
        return Profile(ffns=ffns, config=config, tokens=tokens, source=source)


def _progress(records: list, config: CalibrationConfig, desc: str):
    if config.progress and len(records) > 1:
        from tqdm.auto import tqdm

        return tqdm(records, desc=desc, leave=False)
    return records


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
