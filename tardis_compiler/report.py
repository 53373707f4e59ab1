"""What the backend did to each graph, and what it costs: the data behind ``explain``."""
from __future__ import annotations

import dataclasses
from typing import Any

# Re-exported: the formula lived here before the bytes accounting got its own module.
from .accounting import ffn_bytes_per_token  # noqa: F401


@dataclasses.dataclass
class FFNReport:
    """One FFN: where it is, what happened to it, and what it reads per token."""

    name: str
    pattern: str
    activation: str
    status: str  # "rewritten", "calibrating", "dense" or "skipped"
    reason: str = ""
    d_in: int = 0
    d_hidden: int = 0
    d_out: int = 0
    coverage: float | None = None
    flag_rate: float | None = None  # calibration holdout, for the chosen guard
    recall: float | None = None
    rel_error: float | None = None
    error_bound: float | None = None
    runtime_flag_rate: float | None = None  # measured on explain's inputs
    runtime_corrected_rate: float | None = None
    bytes_dense: int = 0
    bytes_tardis: float | None = None
    resident_dense: int = 0  # FFN weights held in memory
    resident_tardis: int | None = None  # the model's weights plus what tardis adds
    guard_kernel: str = ""
    elem_bytes: int = 4
    dtype: str = "float32"  # the weights' dtype
    has_bias: bool = True
    kind: str = "plain"  # or "gated"
    policy: dict[str, int] | None = None  # neurons per option (exact, guarded@p, folded, ...), if a mix was fitted

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class GraphReport:
    """One dynamo graph: its FFNs, notes (calibration calls, why it stayed dense), rewritten code."""

    index: int
    guard: str
    ffns: list[FFNReport] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    code: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return {"index": self.index, "guard": self.guard, "notes": self.notes, "code": self.code,
                "ffns": [f.to_dict() for f in self.ffns]}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(graphs: list[GraphReport]) -> str:
    """A fixed-width table of every FFN in ``graphs``, then the notes."""
    header = ("FFN", "status", "pattern", "cover", "flag", "recall", "rel.err", "MB/tok dense",
              "MB/tok tardis")
    rows = []
    for g in graphs:
        for f in g.ffns:
            status = f.status if not f.reason else f"{f.status}: {f.reason}"
            flag = f.runtime_flag_rate if f.runtime_flag_rate is not None else f.flag_rate
            rows.append((f.name or "<root>", status, f.pattern, _fmt(f.coverage, ".3f"), _fmt(flag, ".3f"),
                         _fmt(f.recall, ".4f"), _fmt(f.rel_error, ".2e"), _fmt(f.bytes_dense / 1e6, ".3f"),
                         _fmt(None if f.bytes_tardis is None else f.bytes_tardis / 1e6, ".3f")))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    widths[1] = min(widths[1], 60)
    lines = ["  ".join(str(c)[:w].ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    dense = sum(f.bytes_dense for g in graphs for f in g.ffns)
    tardis = sum(f.bytes_tardis if f.bytes_tardis is not None else f.bytes_dense for g in graphs for f in g.ffns)
    if dense:
        lines.append(f"FFN weight bytes read per token: dense {dense / 1e6:.3f} MB, tardis {tardis / 1e6:.3f} MB "
                     f"({tardis / dense:.3f} of dense)")
        held = sum(f.resident_dense for g in graphs for f in g.ffns)
        held_tardis = sum(f.resident_tardis or f.resident_dense for g in graphs for f in g.ffns)
        lines.append(f"FFN weight bytes resident: dense {held / 1e6:.3f} MB, tardis {held_tardis / 1e6:.3f} MB "
                     f"({held_tardis / held:.3f} of dense: the model keeps its weights; the packs, with Wf, the "
                     "guard and the bundles of the neurons that can take the exact path, come on top)")
    mixes = [(f, mix_summary(f.policy)) for g in graphs for f in g.ffns if f.policy]
    if mixes:
        lines.append("Neuron mix per FFN (exact: always computed; guarded@p: folded on a range holding p of "
                     "calibration inputs, exact when flagged; folded/dropped: never computed):")
        lines.extend(f"  {f.name}: {mix}; reads {f.bytes_tardis / f.bytes_dense:.3f} of dense" for f, mix in mixes)
    for g in graphs:
        lines.extend(f"graph {g.index}: {note}" for note in g.notes)
    return "\n".join(lines)


def mix_summary(counts: dict[str, int]) -> str:
    """One line for an FFN's neuron mix.

    Example:
        >>> mix_summary({"exact": 3, "guarded@0.7": 10, "guarded@0.9": 5, "folded": 2})
        'exact 3, guarded 15 (p=0.7: 10, p=0.9: 5), folded 2'
    """
    guarded = {k.split("@")[1]: n for k, n in counts.items() if k.startswith("guarded@")}
    parts = [f"exact {counts.get('exact', 0)}"]
    if guarded:
        detail = ", ".join(f"p={p}: {n}" for p, n in guarded.items())
        parts.append(f"guarded {sum(guarded.values())} ({detail})")
    parts += [f"{k} {counts[k]}" for k in ("folded", "dropped") if counts.get(k)]
    return ", ".join(parts)
