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

from .calibrate.record import Recorder
from .calibrate.record import recording, recording_graph
from .options import TardisOptions
from .passes import FFNMatch, PassContext, copy_graph_module, find_ffns, fold_ffns, placeholder_fqns
from .passes.context import ffn_slots, refuse_training_graph
from .passes.fold_ffns import folded_in_order
# Raised by refuse_training_graph; re-exported, as tc.TrainingModeError is imported from here.
from .passes.context import TrainingModeError  # noqa: F401
from .plan import FFNPlan, PlanRequest, plan_ffn
from .profile import Profile
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
        matches, plans = self._select(gm, example_inputs, positions, report)
        if plans and opts.profile is not None:  # before any compile work: a mismatch must fail fast
            opts.profile.check({p.name: p.signature() for p in plans.values()})
            plans = {name: p.calibrated(opts.profile.ffns[name]) for name, p in plans.items()}
            for row in report.ffns:
                if row.name in plans and not plans[row.name].rewritten:
                    row.status, row.reason = "dense", plans[row.name].reason
            plans = {name: p for name, p in plans.items() if p.rewritten}
        if not plans:
            report.code = gm.code
            return self._inner(gm, example_inputs)

        ctx = PassContext(opts, set(plans))
        folded = fold_ffns(copy_graph_module(gm), ctx)
        report.code = folded.code
        for line in ctx.log:
            log.info("tardis graph %d: %s", report.index, line)
        ordered = [plans[name] for name in folded.meta["tardis_folded"]]
        slots = [ffn_slots(m, positions) for m in folded_in_order(matches, folded)]
        dtype = example_inputs[slots[0].first_position].dtype
        compiled = self._inner(folded, [*example_inputs, *dummy_pack_inputs(slots, _device_of(example_inputs), dtype)],
                               pack_inputs=True)
        packs = GraphPacks(slots, ordered)
        self._packs.append(packs)
        rows = {row.name: row for row in report.ffns}
        report.notes.append(f"FFN runtime: {kernel_status()}")

        if opts.profile is not None:
            profile: Profile = opts.profile
            for plan in ordered:
                plan.fill(rows[plan.name])
            report.notes.append(f"profile: {profile.source} ({profile.tokens} tokens)")
            return PackedGraph(compiled, packs, profile)

        recording_gm = recording_graph(gm, PassContext(opts, ctx.names))
        for plan in ordered:
            rows[plan.name].status = "calibrating"
        return AutoCalibratingGraph(recording_gm, compiled, packs, opts, report,
                                    self.states if self.states is not None else STATES)

    def _select(self, gm: GraphModule, example_inputs, positions,
                report: GraphReport) -> tuple[list[FFNMatch], dict[str, FFNPlan]]:
        """Find the FFNs, report each, and return them with the plans of those to rewrite (none
        when autograd is on)."""
        opts = self.options
        request = PlanRequest(guard=opts.guard, skip=opts.skip, door="graph",
                              calibration=opts.profile.config if opts.profile is not None else opts.calibration)
        matches, skipped = find_ffns(gm, placeholder_fqns(gm))
        for s in skipped:
            report.ffns.append(FFNReport(s.name, s.pattern, "-", "skipped", s.reason))
        plans = {}
        for m in matches:
            plan = plan_ffn(m, request)
            report.ffns.append(plan.row(ffn_slots(m, positions).weights(example_inputs)))
            if plan.rewritten:
                plans[plan.name] = plan
        if plans and torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs):
            note = ("left dense: autograd is on and weights require grad; folding is inference-only, "
                    "call the model under torch.no_grad() or torch.inference_mode()")
            warnings.warn(f"tardis: {note}", stacklevel=3)
            report.notes.append(note)
            for row in report.ffns:
                if row.status == "rewritten":
                    row.status, row.reason = "dense", "autograd on"
            return matches, {}
        return matches, plans

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
        state = self.states.get([args[f.first_position] for f in ffns], self.options)
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
                for plan in self.packs.plans:
                    if plan.name == row.name and row.name in state.profile.ffns:
                        plan.calibrated(state.profile.ffns[row.name]).fill(row)
        return out


def _device_of(inputs: Sequence[Any]) -> torch.device:
    for t in inputs:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")
