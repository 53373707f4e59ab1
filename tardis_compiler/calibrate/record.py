"""Record: keep a reservoir of each FFN's inputs while real text runs (calibration's first step).

A recording graph is the captured graph with a hook before each FFN (``passes/record_ffn_inputs``)
that hands the FFN's input to the recorder of the innermost ``recording`` block of the running
thread. ``RECORDING_BACKEND`` is the torch.compile backend ``record`` runs models with; the tardis
backend builds the same recording graph (``recording_graph``) while it auto-calibrates.

We record FFN *inputs* x (d per token), not z (m = 4d per token), and recompute z when fitting.
"""
from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch.fx import GraphModule

from ..options import TardisOptions
from ..passes.context import PassContext, copy_graph_module, ffn_slots, placeholder_fqns, refuse_training_graph
from ..passes.find_ffns import find_ffns
from ..passes.fold_ffns import fold_ffns, folded_in_order
from ..passes.record_ffn_inputs import record_ffn_inputs
from ..runtime.graph_packs import GraphPacks
from ..runtime.quantize import reference_weights

if TYPE_CHECKING:
    from .drive import Recorder


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
        return reference_weights("gated" if self.gated else "plain", floats, weights)

    @property
    def gated(self) -> bool:
        """True for a gated FFN (weights wg_rows, wu_rows, wd_rows and biases)."""
        return "wg_rows" in self.weights

    def tokens(self) -> torch.Tensor:
        """The kept input rows, (n, d_in) float32."""
        return self.samples[:self.filled] if self.samples is not None else torch.empty(0, 0)


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
            self.order = [ffn_slots(m, self.positions) for m in folded_in_order(self.matches, gm)]
            self.forward = gm.forward
        guards = tuple(recorder.guards[f.kind] for f in self.order)
        key = (guards, recorder.config.group_size)
        if key not in self.packs:
            self.packs[key] = GraphPacks(self.order, list(guards), recorder.config.group_size)
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
