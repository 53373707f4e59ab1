"""Record: keep a reservoir of each FFN's inputs while real text runs (calibration's first step).

A recording graph is the captured graph with a hook before each FFN (``passes/record_ffn_inputs``)
that hands the FFN's input to the recorder of the innermost ``recording`` block of the running
thread. ``RECORDING_BACKEND`` is the torch.compile backend ``record`` runs models with; the tardis
backend builds the same recording graph (``recording_graph``) while it auto-calibrates.

We record FFN *inputs* x (d per token), not z (m = 4d per token), and recompute z when fitting.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.fx import GraphModule

from ..config import DEFAULT_GUARDS, CalibrationConfig
from ..options import TardisOptions
from ..plan import PlanRequest, plan_ffn
from ..passes.context import PassContext, copy_graph_module, ffn_slots, placeholder_fqns, refuse_training_graph
from ..passes.find_ffns import find_ffns
from ..passes.fold_ffns import fold_ffns, folded_in_order
from ..passes.record_ffn_inputs import record_ffn_inputs
from ..runtime.graph_packs import GraphPacks
from ..runtime.ffn_kind import KINDS, FFNKind
from ..profile import Profile
from ..runtime.quantize import reference_weights
from .allocate import fit_policy_ffns
from .coverage import fit_ffn
from .loss_weights import OutputGradients

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
        Rows with a NaN or Inf are dropped (and counted): one would poison every neuron's fit.

        Example:
            >>> rec = FFNRecord("f", "p", "gelu", {}, max_tokens=16, seed=0)
            >>> rec.add(torch.randn(40, 4)); rec.tokens().shape, rec.seen
            (torch.Size([16, 4]), 40)
        """
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

    def float_weights(self, weights: str | None = None) -> dict[str, torch.Tensor | None]:
        """float32 CPU copies of the weights, as the fitting steps compute with them: with
        ``weights="int8"`` those of the quantized reference (``runtime/quantize.reference_weights``)."""
        floats = {k: (v.detach().float().cpu() if v is not None else None) for k, v in self.weights.items()}
        return reference_weights(self.kind.name, floats, weights)

    @property
    def kind(self) -> FFNKind:
        """The FFN's kind, from the names of its neuron-major weights (``runtime/ffn_kind.py``)."""
        return next(k for k in KINDS.values() if k.first_row in self.weights)

    def tokens(self) -> torch.Tensor:
        """The kept input rows, (n, d_in) float32."""
        return self.samples[:self.filled] if self.samples is not None else torch.empty(0, 0)


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
        by_policy = [r for r in self.ffns.values() if r.kind.always_mixed or mix_all]
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


class EnoughRecorded(Exception):
    """Raised by the hook once the recorder's ``stop_after`` FFN has its input: the rest of the
    forward pass would record nothing (sequential calibration stops the model there)."""


def record_ffn_input(x: torch.Tensor, name: str) -> None:
    """Graph hook inserted by the recording pass: hand an FFN's input to the active recorder."""
    recorder = active_recorder()
    if recorder is not None and name in recorder.ffns:
        recorder.ffns[name].add(x)
        if name == recorder.stop_after:
            raise EnoughRecorded(name)


def recording_graph(gm: GraphModule, ctx: PassContext) -> GraphModule:
    """A copy of ``gm`` that calls ``record_ffn_input`` on the input of each FFN ``ctx`` selects;
    it computes exactly what ``gm`` does.

    Example:
        >>> # the backend, auto-calibrating: recording_graph(gm, PassContext(options, names))
    """
    return record_ffn_inputs(copy_graph_module(gm), ctx, record_ffn_input)


def _recording_backend(gm: GraphModule, example_inputs: Sequence[Any], **_) -> Callable:
    """The backend of ``calibrate``: the graph runs eagerly, unchanged, handing FFN inputs to the
    recorder of the ``recording`` block it is called in (``RECORDING_BACKEND``: one object, so
    dynamo reuses its graphs across calibrations)."""
    refuse_training_graph(gm)
    matches, _ = find_ffns(gm, placeholder_fqns(gm))
    positions = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
    slots = [ffn_slots(m, positions) for m in matches]
    forward = recording_graph(gm, PassContext(TardisOptions(), {m.name for m in matches})).forward
    folded = _FoldedRecording(gm, matches, positions)

    def run(*args):
        recorder = active_recorder()
        if recorder is None:
            return forward(*args)
        for f in slots:
            recorder.register(f.name, f.pattern, f.activation, f.weights(args))
        if recorder.prefix is not None and any(f.name in recorder.prefix.ffns for f in slots):
            return folded(recorder, args)
        return forward(*args)

    return run


class _FoldedRecording:
    """The recording graph with every FFN folded (sequential calibration): each call runs the
    FFNs of ``recorder.prefix`` (a profile whose FFNs not yet calibrated are exact stand-ins)
    through the op, every token through the pack (``dense_above=None``), and records the inputs
    the later FFNs see. Built on first use."""

    def __init__(self, gm: GraphModule, matches: list, positions: dict) -> None:
        # A copy now: dynamo drops the node metadata the passes match on once the backend returns.
        self.gm = copy_graph_module(gm)
        self.matches, self.positions = matches, positions
        self.forward: Callable | None = None
        self.packs: dict[tuple, GraphPacks] = {}

    def __call__(self, recorder: Recorder, args: Sequence[Any]) -> Any:
        options = TardisOptions(dense_above=None)
        if self.forward is None:
            names = {m.name for m in self.matches}
            # Hooks first: folding replaces the FFNs, after which no pass could find their inputs.
            gm = record_ffn_inputs(self.gm, PassContext(options, names), record_ffn_input)
            gm = fold_ffns(gm, PassContext(options, names))
            self.order = folded_in_order(self.matches, gm)
            self.forward = gm.forward
        guards = tuple(recorder.guards[m.kind] for m in self.order)
        key = (guards, recorder.config.group_size)
        if key not in self.packs:
            # Every FFN runs folded here, the skipped ones too (the prefix holds exact stand-ins).
            request = dataclasses.replace(recorder.config, skip=())
            plans = [plan_ffn(m, PlanRequest(guard=guard, calibration=request)) for m, guard in zip(self.order, guards)]
            self.packs[key] = GraphPacks([ffn_slots(m, self.positions) for m in self.order], plans)
        return self.forward(*args, *self.packs[key].flat(args, recorder.prefix))


RECORDING_BACKEND = _recording_backend


def run_recording(model: torch.nn.Module, batches: Sequence[Any], recorder: Recorder, desc: str) -> None:
    """Run ``batches`` through ``model`` compiled with ``RECORDING_BACKEND``, recording into
    ``recorder``; a pass that stops early (``EnoughRecorded``) ends its batch there.

    Example:
        >>> # run_recording(model, batches, Recorder(config), "tardis: recording FFN inputs")
    """
    # One backend object for every calibration: dynamo reuses its graphs across calls (a new
    # backend per call would recompile each time and, by the 9th, hit dynamo's recompile limit).
    compiled = torch.compile(model, backend=RECORDING_BACKEND, dynamic=None)
    progress = batches
    if recorder.config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(batches, desc=desc)
    with torch.no_grad(), recording(recorder):
        for batch in progress:
            try:
                call_model(compiled, batch)
            except EnoughRecorded:
                pass


def call_model(model: Callable, batch: Any) -> Any:
    """``model(**batch)`` for a dict, ``model(*batch)`` for a tuple or list, else ``model(batch)``."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)
