"""Inspect: what the tardis backend rewrote in a model, why, and what it reads per token."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from .backend import CalibrationStates, TardisCompiler
from .moe import routed_experts
from .options import TardisOptions
from .report import FFNReport, GraphReport, render_table
from .runtime.ffn_op import dense_above_for
from .runtime.stats import FFNCounters, collect_stats


@dataclasses.dataclass
class ExplainReport:
    """Per graph, per FFN: pattern, activation rule, status or skip reason, range coverage, flag
    rates (calibration and on the example inputs), recall, error, bytes read per token, and the
    rewritten graph code. ``print(report)`` shows the table; ``report.code`` the graphs.

    An FFN whose measured calls all ran the dense FFN (more tokens per call than ``dense_above``)
    has no measured flag rate (``runtime_flag_rate`` None: the table shows calibration's) and a note
    in its graph's report saying so. ``not_considered``: (module FQN, reason) of weights no FFN match
    covers (routed MoE experts: ``moe.routed_experts``), which run dense."""

    graphs: list[GraphReport]
    not_considered: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    @property
    def ffns(self):
        """Every FFN row, in graph order."""
        return [f for g in self.graphs for f in g.ffns]

    @property
    def code(self) -> str:
        """The rewritten Python code of every graph."""
        return "\n".join(f"# graph {g.index}\n{g.code}" for g in self.graphs)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"graphs": [g.to_dict() for g in self.graphs],
                "not_considered": [{"module": name, "reason": reason} for name, reason in self.not_considered]}

    def to_json(self, path: str) -> None:
        """Write ``to_dict()`` to ``path``."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def __str__(self) -> str:
        return "\n".join([render_table(self.graphs), *(f"not considered: {name or '<root>'} ({reason})"
                                                      for name, reason in self.not_considered)])


def explain(model: torch.nn.Module, *example_inputs: Any, **options: Any) -> ExplainReport:
    """Compile ``model`` with the tardis backend on ``example_inputs`` and report what happened.

    Takes the same keywords as ``torch.compile(..., backend="tardis", options=...)``. Without a
    profile it runs the inputs ``calibration_calls`` times to auto-calibrate, then once more; with
    one, once. The last call is measured (flag rates on these inputs). Calls of more tokens than
    ``dense_above`` run the dense FFN and flag nothing: pass ``dense_above=None`` to measure the
    approximation on long inputs (the report's notes say when it did not). A single dict input is
    passed as keyword arguments. The model is not modified, and no state is left behind: a later
    ``torch.compile(model, backend="tardis")`` calibrates afresh.

    Example:
        >>> import torch, tardis_compiler as tc
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
        >>> report = tc.explain(mlp, torch.randn(64, 16), inner="eager", calibration_calls=1)
        >>> report.ffns[0].status, report.ffns[0].activation
        ('rewritten', 'gelu')
    """
    opts = TardisOptions.from_mapping(options)
    graphs: list[GraphReport] = []
    # Its own auto-calibration states and recompile region: explaining leaves no state behind that a
    # later torch.compile could pick up, and repeated explains do not exhaust dynamo's recompile limit.
    states = CalibrationStates()
    compiler = TardisCompiler(opts, reports=graphs, states=states)
    compiled = torch.compile(model, backend=compiler, isolate_recompiles=True)
    warmup = 0 if opts.profile is not None else opts.calibration_calls
    try:
        with torch.no_grad():
            for _ in range(warmup):
                _call(compiled, example_inputs)
            with collect_stats() as stats:
                _call(compiled, example_inputs)
    finally:
        states.clear()
        compiler.release()
    for graph in graphs:
        _fill_measured(graph, stats.ffns, opts)
    found = [f.name for g in graphs for f in g.ffns if f.status != "skipped"]  # skipped: patterns, not FFNs
    return ExplainReport(graphs, routed_experts(model, found) if isinstance(model, torch.nn.Module) else [])


def _fill_measured(graph: GraphReport, measured: dict[str, FFNCounters], opts: TardisOptions) -> None:
    """Flag rates measured on the pack calls of the measured run; a note for FFNs whose calls ran
    the dense FFN (``dense_above``), so a missing rate is not read as zero flags."""
    all_dense: dict[str, list[str]] = {}
    for row in graph.ffns:
        counters = measured.get(row.name)
        if counters is None:
            continue
        if counters.calls:
            row.runtime_flag_rate = counters.flag_rate
            row.runtime_corrected_rate = counters.corrected_rate
        if not counters.dense_calls:
            continue
        how = (f"calls of {_tokens_per_call(counters)} tokens ran the dense FFN "
               f"(dense_above={_threshold(opts, row)})")
        if counters.calls:
            graph.notes.append(f"{row.name or '<root>'}: {counters.dense_calls} of "
                               f"{counters.calls + counters.dense_calls} {how}; its measured flag rate counts "
                               f"the other {counters.calls}")
        else:
            all_dense.setdefault(how, []).append(row.name or "<root>")
    rewritten = [row for row in graph.ffns if row.name in measured]
    for how, names in all_dense.items():
        which = f"every rewritten FFN ({len(names)})" if len(names) == len(rewritten) else ", ".join(names)
        graph.notes.append(f"{which}: {how}: flag rate not measured on these inputs (the table shows "
                           "calibration's); pass dense_above=None to measure the approximation on these inputs")


def _tokens_per_call(counters: FFNCounters) -> str:
    per_call, rest = divmod(counters.dense_tokens, counters.dense_calls)
    return str(per_call) if not rest else f"{counters.dense_tokens / counters.dense_calls:.1f} (mean)"


def _threshold(opts: TardisOptions, row: FFNReport) -> str:
    """The ``dense_above`` the FFN's op ran with, as the options spell it."""
    if opts.dense_above == "auto":
        dtype = getattr(torch, row.dtype, torch.float32)
        return f"'auto': {dense_above_for(dtype)} in {row.dtype}"
    return str(opts.dense_above)


def _call(model, inputs):
    if len(inputs) == 1 and isinstance(inputs[0], dict):
        return model(**inputs[0])
    return model(*inputs)
