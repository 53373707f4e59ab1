"""Capture: the ``"tardis"`` torch.compile backend.

``torch.compile(model, backend="tardis", options={...})`` finds the plain FFNs of each dynamo
graph and replaces them with the fused ``tardis::folded_ffn`` op, then hands the graph to inductor
(or runs it eagerly with ``inner="eager"``). Registered through the ``torch_dynamo_backends`` entry
point, so no import is needed.

With a profile, every FFN in the graph must be in it (same shapes and activation). Without one,
the compiled callable runs the dense graph for ``calibration_calls`` calls while recording FFN
inputs, then fits a profile and switches to the folded graph. That state is keyed by the FFN
weights the graph is called with, because dynamo reuses one graph for every instance of a class.
"""
from __future__ import annotations

import collections
import itertools
import logging
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from .calibrate import Recorder, recording
from .config import TardisOptions
from .passes import (FFNMatch, PassContext, copy_graph_module, find_ffns, fold_ffns,
                     placeholder_fqns, record_ffn_inputs)
from .calibrate_gated import gated_dense_bytes
from .profile import FFNProfile, Profile
from .report import FFNReport, GraphReport, ffn_bytes_per_token, resident_bytes_added
from .runtime.fold import neuron_major, w2_neuron_major

log = logging.getLogger("tardis_compiler")
_GRAPH_IDS = itertools.count()


class TrainingModeError(ValueError):
    """The captured graph trains (dropout active): folding weights is not valid there."""


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
                 reports: list[GraphReport] | None = None) -> None:
        self.options = options
        self.mode = mode
        self.reports = reports

    def __call__(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        opts = self.options
        report = GraphReport(index=next(_GRAPH_IDS), guard=opts.guard or "default")
        if self.reports is not None:
            self.reports.append(report)
        _refuse_training_graph(gm)
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
        ordered = _in_order(selected, folded.meta["tardis_folded"])
        device = _device_of(example_inputs)
        dummy = [torch.zeros(6, m.d_hidden, device=device) for m in ordered]  # shapes only
        compiled = self._inner(folded, [*example_inputs, *dummy])
        rows = {row.name: row for row in report.ffns}

        if opts.profile is not None:
            profile: Profile = opts.profile
            for m in ordered:
                _fill_from_profile(rows[m.name], profile.ffns[m.name], opts.guard_for(m.kind))
            report.notes.append(f"profile: {profile.source} ({profile.tokens} tokens)")
            packs = [profile.ffns[m.name].params(opts.guard_for(m.kind)).to(device) for m in ordered]
            return _with_params(compiled, packs)

        recording_gm = record_ffn_inputs(copy_graph_module(gm), PassContext(opts, ctx.names))
        for m in ordered:
            rows[m.name].status = "calibrating"
        return AutoCalibratingGraph(recording_gm, compiled, ordered, positions, opts, report)

    def _select(self, gm: GraphModule, example_inputs, positions, report: GraphReport) -> list[FFNMatch]:
        """Find the FFNs, report each, and return those to rewrite (none when autograd is on)."""
        matches, skipped = find_ffns(gm, placeholder_fqns(gm))
        for s in skipped:
            report.ffns.append(FFNReport(s.name, s.pattern, "-", "skipped", s.reason))
        selected = []
        for m in matches:
            row = _row(m, example_inputs, positions)
            report.ffns.append(row)
            if self.options.skips(m.name):
                row.status, row.reason = "dense", "excluded by options['skip']"
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

    def _inner(self, gm: GraphModule, example_inputs: Sequence[Any]) -> Callable:
        if self.options.inner == "eager":
            return gm.forward
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = list_mode_options(self.mode) if self.mode else None
        return compile_fx(gm, list(example_inputs), config_patches=patches)


def _with_params(compiled: Callable, packs: list[torch.Tensor]) -> Callable:
    def run(*args):
        return compiled(*args, *packs)

    return run


class _CalibrationState:
    def __init__(self, recorder: Recorder, fingerprint: float) -> None:
        self.recorder = recorder
        self.fingerprint = fingerprint
        self.calls = 0
        self.profile: Profile | None = None


# Keyed by the data pointers of a graph's FFN weights: one state per model instance, shared by
# every graph (prefill, decode, recompiles) that runs on those weights.
_STATES: collections.OrderedDict = collections.OrderedDict()
_MAX_STATES = 64


class AutoCalibratingGraph:
    """Runs dense while recording the first ``calibration_calls`` calls, then the folded graph."""

    def __init__(self, recording_gm: GraphModule, compiled: Callable, matches: list[FFNMatch],
                 positions: dict, options: TardisOptions, report: GraphReport) -> None:
        self.recording_gm = recording_gm
        self.compiled = compiled
        self.options = options
        self.report = report
        self.ffns = [(m.name, m.pattern, m.activation.name, _weight_slots(m, positions)) for m in matches]

    def __call__(self, *args):
        state = self._state(args)
        if state.profile is not None:
            return self.compiled(*args, *self._packs(state.profile, args))
        for name, pattern, act, slots in self.ffns:
            state.recorder.register(name, pattern, act, _weights(slots, args))
        with torch.no_grad(), recording(state.recorder):
            out = self.recording_gm(*args)
        state.calls += 1
        if state.calls >= self.options.calibration_calls:
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
                    _fill_from_profile(row, ffn, self.options.guard_for(ffn.kind))
        return out

    def _state(self, args) -> _CalibrationState:
        first = args[self.ffns[0][3]["key"]]
        key = tuple(args[slots["key"]].data_ptr() for _, _, _, slots in self.ffns)
        fingerprint = float(first.reshape(-1)[:: max(1, first.numel() // 16)].double().sum())
        state = _STATES.get(key)
        if state is None or state.fingerprint != fingerprint:
            state = _CalibrationState(Recorder(self.options.calibration), fingerprint)
            _STATES[key] = state
            while len(_STATES) > _MAX_STATES:
                _STATES.popitem(last=False)
        _STATES.move_to_end(key)
        return state

    def _packs(self, profile: Profile, args) -> list[torch.Tensor]:
        cache = getattr(profile, "_packs", None)
        if cache is None:
            device = _device_of(args)
            cache = [ffn.params(self.options.guard_for(ffn.kind)).to(device)
                     for ffn in (profile.ffns[name] for name, *_ in self.ffns)]
            profile._packs = cache
        return cache


def recording_backend(recorder: Recorder) -> Callable:
    """A backend for ``calibrate``: FFN inputs go to ``recorder``; the graph runs eagerly, unchanged."""

    def backend(gm: GraphModule, example_inputs: Sequence[Any], **_) -> Callable:
        _refuse_training_graph(gm)
        fqns = placeholder_fqns(gm)
        matches, _ = find_ffns(gm, fqns)
        positions = {node: i for i, node in enumerate(gm.graph.find_nodes(op="placeholder"))}
        for m in matches:
            recorder.register(m.name, m.pattern, m.activation.name,
                              _weights(_weight_slots(m, positions), example_inputs))
        ctx = PassContext(TardisOptions(), {m.name for m in matches})
        return record_ffn_inputs(copy_graph_module(gm), ctx).forward

    return backend


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

    with torch.no_grad():
        torch.compile(model, backend=backend)(*inputs, **kwargs)
    return graphs


def _refuse_training_graph(gm: GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is F.dropout:
            training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
            if training is True:
                raise TrainingModeError(
                    "tardis folds weights for inference, but this model is in training mode "
                    f"(dropout is active at {node.name!r}). Call model.eval() before compiling "
                    "with backend='tardis'.")


def _row(m, example_inputs, positions) -> FFNReport:
    linears = [m.gate, m.up, m.down] if m.kind == "gated" else [m.first, m.second]
    w1 = example_inputs[positions[linears[0].weight]]
    has_bias = any(lin.bias is not None for lin in linears)
    row = FFNReport(m.name, m.pattern, m.activation.name, "rewritten", d_in=m.d_in, d_hidden=m.d_hidden,
                    d_out=m.d_out, kind=m.kind)
    row.elem_bytes, row.has_bias = w1.element_size(), has_bias
    if m.kind == "gated":
        row.bytes_dense = gated_dense_bytes(m.d_in, m.d_hidden, m.d_out, row.elem_bytes,
                                            m.gate.bias is not None or m.up.bias is not None, m.down.bias is not None)
        row.copied_weights = 1  # W_d, to neuron-major rows
    else:
        row.bytes_dense = ffn_bytes_per_token(m.d_in, m.d_hidden, m.d_out, row.elem_bytes, has_bias)
        # The exact path reads neuron rows; weights stored the other way round get a row-major copy.
        row.copied_weights = int(m.first.layout == "in_out") + int(m.second.layout == "out_in")
    row.resident_dense = row.bytes_dense
    return row


def _fill_from_profile(row: FFNReport, ffn: FFNProfile, guard: str) -> None:
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
    guard_bytes = measured.get("bytes", 0) if measured else 0
    fold = not ffn.has_policy or ffn.stats["policy"]["folded_matrix"]
    row.resident_tardis = row.resident_dense + resident_bytes_added(
        ffn.d_in, ffn.d_hidden, ffn.d_out, row.elem_bytes, guard_bytes, row.copied_weights, fold)
    row.bytes_tardis = ffn.bytes_per_token(guard, row.elem_bytes, row.has_bias)  # live dtype, not calibration's


def _weight_slots(m, positions: dict) -> dict:
    """Where an FFN's weights sit among the graph's inputs, and their layouts; ``key`` is the
    weight that identifies a model instance."""
    if m.kind == "gated":
        return {"kind": "gated", "key": positions[m.gate.weight],
                "wg": positions[m.gate.weight], "bg": positions.get(m.gate.bias),
                "wu": positions[m.up.weight], "bu": positions.get(m.up.bias),
                "wd": positions[m.down.weight], "bd": positions.get(m.down.bias),
                "offsets": (m.gate_offset, m.up_offset), "m": m.d_hidden}
    return {"kind": "plain", "key": positions[m.first.weight],
            "w1": positions[m.first.weight], "b1": positions.get(m.first.bias),
            "w2": positions[m.second.weight], "b2": positions.get(m.second.bias),
            "layouts": (m.first.layout, m.second.layout)}


def _weights(slots: dict, values: Sequence[Any]) -> dict:
    """The FFN's weights from the graph's input ``values``, neuron-major, as calibration wants them."""
    bias = lambda k: values[slots[k]] if slots[k] is not None else None  # noqa: E731
    if slots["kind"] == "gated":
        (go, uo), m = slots["offsets"], slots["m"]
        rows = lambda k, off: values[slots[k]].narrow(0, off, m)  # noqa: E731
        cut = lambda b, off: b.narrow(0, off, m) if b is not None else None  # noqa: E731
        return {"wg_rows": rows("wg", go), "bg": cut(bias("bg"), go), "wu_rows": rows("wu", uo),
                "bu": cut(bias("bu"), uo), "wd_rows": values[slots["wd"]].t(), "bd": bias("bd")}
    l1, l2 = slots["layouts"]
    return {"w1_rows": neuron_major(values[slots["w1"]], l1), "b1": bias("b1"),
            "w2_rows": w2_neuron_major(values[slots["w2"]], l2), "b2": bias("b2")}


def _in_order(matches: list[FFNMatch], names: list[str]) -> list[FFNMatch]:
    by_name = {m.name: m for m in matches}
    return [by_name[n] for n in names]


def _device_of(inputs: Sequence[Any]) -> torch.device:
    for t in inputs:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")
