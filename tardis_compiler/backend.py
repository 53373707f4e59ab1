"""Capture: the ``"tardis"`` torch.compile backend.

``torch.compile(model, backend="tardis", options={...})`` finds the FFNs (plain and gated) of each
dynamo graph and replaces each with the fused ``tardis::ffn`` op, then hands the graph to inductor
(or runs it eagerly with ``inner="eager"``). Registered through the ``torch_dynamo_backends`` entry
point, so no import is needed.

With a profile, every FFN in the graph must be in it (same shapes and activation). Without one,
the compiled callable runs the dense graph for ``calibration_calls`` calls while recording FFN
inputs, then fits a profile and switches to the folded graph. That state is keyed by the FFN
weights the graph is called with, because dynamo reuses one graph for every instance of a class.
"""
from __future__ import annotations

import itertools
import logging
import threading
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
from torch.fx import GraphModule

from .accounting import ffn_bytes_per_token, gated_dense_bytes
from .calibrate.drive import Recorder
from .calibrate.record import recording, recording_graph
from .options import TardisOptions
from .passes import FFNMatch, PassContext, copy_graph_module, find_ffns, fold_ffns, placeholder_fqns
from .passes.context import ffn_slots, refuse_training_graph
from .passes.fold_ffns import folded_in_order
# Raised by refuse_training_graph; re-exported, as tc.TrainingModeError is imported from here.
from .passes.context import TrainingModeError  # noqa: F401
from .profile import FFNProfile, Profile
from .report import FFNReport, GraphReport
from .runtime.cpu.kernel import status as kernel_status
from .runtime.graph_packs import GraphPacks, dummy_pack_inputs

log = logging.getLogger("tardis_compiler")
_GRAPH_IDS = itertools.count()


def tardis_backend(gm: GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
                   options: dict | None = None) -> Callable:
    """The ``"tardis"`` backend (entry point). Use it through ``torch.compile``.

    Example:
        >>> import torch
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
        >>> fast = torch.compile(mlp, backend="tardis", options={"inner": "eager", "calibration_calls": 2})
        >>> with torch.no_grad():
        ...     outs = [fast(torch.randn(4, 8)) for _ in range(3)]   # 2 dense calls, then folded
        >>> outs[-1].shape
        torch.Size([4, 8])
    """
    return TardisCompiler(TardisOptions.from_mapping(options), mode=mode)(gm, example_inputs)


class TardisCompiler:
    """A backend instance with fixed options; ``reports`` collects a ``GraphReport`` per graph."""

    def __init__(self, options: TardisOptions, mode: str | None = None,
                 reports: list[GraphReport] | None = None, states: "CalibrationStates | None" = None) -> None:
        self.options = options
        self.mode = mode
        self.reports = reports
        self.states = states  # auto-calibration states; None: the process-wide ones (STATES)
        self._packs: list[GraphPacks] = []  # of the graphs compiled so far (``release``)

    def release(self) -> None:
        """Drop what this backend's graphs hold for speed (their packs' fast paths): ``explain``
        calls it, so nothing of an explained model stays alive in dynamo's cache but the graphs."""
        for packs in self._packs:
            packs.forget()

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        opts = self.options
        report = GraphReport(index=next(_GRAPH_IDS), guard=opts.guard or "default")
        if self.reports is not None:
            self.reports.append(report)
        refuse_training_graph(gm)
        positions = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
        selected = self._select(gm, example_inputs, positions, report)
        if not selected:
            report.code = gm.code
            return self._inner(gm, example_inputs)
        if opts.profile is not None:  # before any compile work: a mismatch must fail fast
            opts.profile.check({m.name: (m.d_in, m.d_hidden, m.d_out, m.activation.name, m.kind)
                                for m in selected})

        ctx = PassContext(opts, {m.name for m in selected})
        folded = fold_ffns(copy_graph_module(gm), ctx)
        report.code = folded.code
        for line in ctx.log:
            log.info("tardis graph %d: %s", report.index, line)
        ordered = folded_in_order(selected, folded)
        slots = [ffn_slots(m, positions) for m in ordered]
        dtype = example_inputs[slots[0].slots["wg" if slots[0].kind == "gated" else "w1"]].dtype
        compiled = self._inner(folded, [*example_inputs, *dummy_pack_inputs(slots, _device_of(example_inputs), dtype)],
                               pack_inputs=True)
        packs = GraphPacks(slots, [opts.guard_for(m.kind) for m in ordered], opts.calibration.group_size)
        self._packs.append(packs)
        rows = {row.name: row for row in report.ffns}
        report.notes.append(f"FFN runtime: {kernel_status()}")

        if opts.profile is not None:
            profile: Profile = opts.profile
            for m in ordered:
                _fill_from_profile(rows[m.name], profile.ffns[m.name], opts.guard_for(m.kind), opts.calibration.group_size)
            report.notes.append(f"profile: {profile.source} ({profile.tokens} tokens)")
            return PackedGraph(compiled, packs, profile)

        recording_gm = recording_graph(gm, PassContext(opts, ctx.names))
        for m in ordered:
            rows[m.name].status = "calibrating"
        return AutoCalibratingGraph(recording_gm, compiled, packs, opts, report,
                                    self.states if self.states is not None else STATES)

    def _select(self, gm: GraphModule, example_inputs, positions, report: GraphReport) -> list[FFNMatch]:
        """Find the FFNs, report each, and return those to rewrite (none when autograd is on)."""
        matches, skipped = find_ffns(gm, placeholder_fqns(gm))
        for s in skipped:
            report.ffns.append(FFNReport(s.name, s.pattern, "-", "skipped", s.reason))
        selected = []
        for m in matches:
            row = _row(m, example_inputs, positions)
            report.ffns.append(row)
            skipped_because = self.options.skips(m.name)
            if skipped_because:
                row.status, row.reason = "dense", skipped_because
            elif m.kind == "gated" and any(lin.layout != "out_in" for lin in (m.gate, m.up, m.down)):
                row.status, row.reason = "dense", "gated FFN with a transposed (x @ W) weight: only nn.Linear layouts"
            else:
                selected.append(m)
        if selected and torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
            note = ("left dense: autograd is on and weights require grad; folding is inference-only, "
                    "call the model under torch.no_grad() or torch.inference_mode()")
            warnings.warn(f"tardis: {note}", stacklevel=3)
            report.notes.append(note)
            for row in report.ffns:
                if row.status == "rewritten":
                    row.status, row.reason = "dense", "autograd on"
            return []
        return selected

    def _inner(self, gm: GraphModule, example_inputs: Sequence[Any], pack_inputs: bool = False) -> Callable:
        if self.options.inner == "eager":
            return gm.forward
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = dict(list_mode_options(self.mode)) if self.mode else {}
        if pack_inputs:
            # Pack tensors differ in size between FFNs, instances and profiles, and only the opaque
            # op reads them: the compiled graph must not assert the sizes it was compiled with.
            patches.update(size_asserts=False, alignment_asserts=False)
        return compile_fx(gm, list(example_inputs), config_patches=patches or None)


class PackedGraph:
    """A folded graph: each call appends the packs of the weights it is called with."""

    def __init__(self, compiled: Callable, packs: GraphPacks, profile: Profile) -> None:
        self.compiled, self.packs, self.profile = compiled, packs, profile

    def __call__(self, *args):
        return self.compiled(*args, *self.packs.flat(args, self.profile))


class _CalibrationState:
    def __init__(self, recorder: Recorder, weights: Sequence[torch.Tensor]) -> None:
        self.recorder: Recorder | None = recorder
        self.refs = tuple(weakref.ref(w) for w in weights)
        self.calls = 0
        self.profile: Profile | None = None
        self.lock = threading.Lock()  # one recording call at a time per state


class CalibrationStates:
    """Auto-calibration state per (model weights, options), shared by every graph (prefill,
    decode, recompiles) that runs on those weights with those options. Holds the weights only
    weakly: a deleted model's state goes with it."""

    def __init__(self) -> None:
        self._states: dict[tuple, _CalibrationState] = {}
        self._lock = threading.Lock()

    def get(self, weights: Sequence[torch.Tensor], options: TardisOptions) -> _CalibrationState:
        """The state for these weight objects and options, new if there is none yet."""
        key = (id(weights[0]), _options_key(options))
        with self._lock:
            state = self._states.get(key)
            if state is None or any(ref() is not w for ref, w in zip(state.refs, weights)):
                state = _CalibrationState(Recorder(options.calibration), weights)
                self._states[key] = state
                weakref.finalize(weights[0], self._drop, key, state)
            return state

    def _drop(self, key: tuple, state: _CalibrationState) -> None:
        with self._lock:
            if self._states.get(key) is state:
                del self._states[key]

    def clear(self) -> None:
        """Forget every state (``clear_caches``)."""
        with self._lock:
            self._states.clear()


def _options_key(options: TardisOptions) -> str:
    """What shapes an auto-calibration: the guard, the calls recorded, the calibration config."""
    return repr((options.guard, options.calibration_calls, sorted(options.calibration.to_dict().items())))


STATES = CalibrationStates()


class AutoCalibratingGraph:
    """Runs dense while recording the first ``calibration_calls`` calls, then the folded graph."""

    def __init__(self, recording_gm: GraphModule, compiled: Callable, packs: GraphPacks, options: TardisOptions,
                 report: GraphReport, states: CalibrationStates) -> None:
        self.recording_gm = recording_gm
        self.compiled = compiled
        self.packs = packs
        self.options = options
        self.report = report
        self.states = states

    def __call__(self, *args):
        ffns = self.packs.ffns
        state = self.states.get([args[f.slots["wg" if f.kind == "gated" else "w1"]] for f in ffns], self.options)
        if state.profile is not None:
            return self.compiled(*args, *self.packs.flat(args, state.profile))
        with state.lock:
            if state.profile is not None:  # another thread finished calibrating meanwhile
                return self.compiled(*args, *self.packs.flat(args, state.profile))
            return self._record(state, args)

    def _record(self, state: _CalibrationState, args) -> Any:
        for f in self.packs.ffns:
            state.recorder.register(f.name, f.pattern, f.activation, f.weights(args))
        with torch.no_grad(), recording(state.recorder):
            out = self.recording_gm(*args)
        state.calls += 1
        if state.calls < self.options.calibration_calls:
            state.recorder.release_weights()
        else:
            n = state.calls
            state.profile = state.recorder.fit(source=f"auto-calibration on calls 1-{n}",
                                               guard=self.options.guard)  # None: each kind's default
            state.recorder = None  # free the recorded tokens
            note = (f"calibrated on calls 1-{n} ({state.profile.tokens} tokens); calls after that "
                    "run the folded graph")
            log.info("tardis graph %d: %s", self.report.index, note)
            self.report.notes.append(note)
            for row in self.report.ffns:
                if row.name in state.profile.ffns:
                    ffn = state.profile.ffns[row.name]
                    _fill_from_profile(row, ffn, self.options.guard_for(ffn.kind), self.options.calibration.group_size)
        return out


def capture_graphs(model: torch.nn.Module, *inputs: Any, **kwargs: Any) -> list[tuple[GraphModule, dict]]:
    """Capture ``model``'s dynamo graphs on ``inputs`` (for tests and inspection), with their
    parameter-placeholder FQNs. Runs the model eagerly; nothing is rewritten.

    Example:
        >>> lin = torch.nn.Linear(4, 4)
        >>> (gm, fqns), = capture_graphs(lin, torch.randn(2, 4))
        >>> sorted(fqns.values())
        ['bias', 'weight']
    """
    graphs = []

    def backend(gm, example_inputs, **_):
        # Copy now: dynamo drops the placeholders' source info (our FQNs) once compilation ends.
        copy = copy_graph_module(gm)
        graphs.append((copy, placeholder_fqns(copy)))
        return gm.forward

    # Its own recompile region: a fresh backend per capture must not exhaust dynamo's recompile limit.
    with torch.no_grad():
        torch.compile(model, backend=backend, isolate_recompiles=True)(*inputs, **kwargs)
    return graphs


def _row(m, example_inputs, positions) -> FFNReport:
    linears = [m.gate, m.up, m.down] if m.kind == "gated" else [m.first, m.second]
    w1 = example_inputs[positions[linears[0].weight]]
    has_bias = any(lin.bias is not None for lin in linears)
    row = FFNReport(m.name, m.pattern, m.activation.name, "rewritten", d_in=m.d_in, d_hidden=m.d_hidden,
                    d_out=m.d_out, kind=m.kind)
    row.elem_bytes, row.has_bias, row.dtype = w1.element_size(), has_bias, str(w1.dtype).removeprefix("torch.")
    if m.kind == "gated":
        row.bytes_dense = gated_dense_bytes(m.d_in, m.d_hidden, m.d_out, row.elem_bytes,
                                            m.gate.bias is not None or m.up.bias is not None, m.down.bias is not None)
    else:
        row.bytes_dense = ffn_bytes_per_token(m.d_in, m.d_hidden, m.d_out, row.elem_bytes, has_bias)
    row.resident_dense = row.bytes_dense
    return row


def _fill_from_profile(row: FFNReport, ffn: FFNProfile, guard: str, group_size: int) -> None:
    """Copy calibration measurements for ``guard`` into the row and price the folded FFN."""
    row.status = "rewritten"
    row.coverage = ffn.stats["coverage"]
    row.error_bound = ffn.stats["error_bound"]
    if ffn.has_policy:
        row.policy = ffn.stats["policy"]["counts"]
    measured = ffn.stats["guards"].get(guard)
    if measured is not None:
        row.flag_rate, row.recall, row.rel_error = measured["flag_rate"], measured["recall"], measured["rel_error"]
        row.guard_kernel = measured.get("kernel", guard)
    elif guard == "all":
        row.flag_rate, row.recall, row.rel_error = 1.0, 1.0, 0.0
    layout = ffn.layout(guard, getattr(torch, row.dtype), group_size)
    # The model keeps its own weights (the backend never changes them); the pack comes on top.
    row.resident_tardis = row.resident_dense + layout.resident_bytes()
    row.bytes_tardis = ffn.bytes_per_token(guard, row.elem_bytes, row.has_bias)  # live dtype, not calibration's


def _device_of(inputs: Sequence[Any]) -> torch.device:
    for t in inputs:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")
