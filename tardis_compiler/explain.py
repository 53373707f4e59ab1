"""Inspect: what the tardis backend rewrote in a model, why, and what it reads per token."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch

from .backend import CalibrationStates, TardisCompiler
from .options import TardisOptions
from .report import GraphReport, render_table
from .runtime.stats import collect_stats


@dataclasses.dataclass
class ExplainReport:
    """Per graph, per FFN: pattern, activation rule, status or skip reason, range coverage, flag
    rates (calibration and on the example inputs), recall, error, bytes read per token, and the
    rewritten graph code. ``print(report)`` shows the table; ``report.code`` the graphs."""

    graphs: list[GraphReport]

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
        return {"graphs": [g.to_dict() for g in self.graphs]}

    def to_json(self, path: str) -> None:
        """Write ``to_dict()`` to ``path``."""
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    def __str__(self) -> str:
        return render_table(self.graphs)


def explain(model: torch.nn.Module, *example_inputs: Any, **options: Any) -> ExplainReport:
    """Compile ``model`` with the tardis backend on ``example_inputs`` and report what happened.

    Takes the same keywords as ``torch.compile(..., backend="tardis", options=...)``. Without a
    profile it runs the inputs ``calibration_calls`` times to auto-calibrate, then once more; with
    one, once. The last call is measured (flag rates on these inputs). A single dict input is
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
    for row in (f for g in graphs for f in g.ffns):
        counters = stats.ffns.get(row.name)
        if counters is not None:
            row.runtime_flag_rate = counters.flag_rate
            row.runtime_corrected_rate = counters.corrected_rate
    return ExplainReport(graphs)


def _call(model, inputs):
    if len(inputs) == 1 and isinstance(inputs[0], dict):
        return model(**inputs[0])
    return model(*inputs)
