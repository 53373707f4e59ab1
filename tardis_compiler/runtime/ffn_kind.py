"""What differs between kinds of FFN, in one place.

A *plain* FFN is ``W2 act(W1 x + b1) + b2``; a *gated* one is ``Wd (act(Wg x + bg) * (Wu x + bu)) + bd``.
Everything else in the package (matching, calibration, packs, the kernel's layout, validation,
reports) asks an ``FFNKind`` rather than testing a kind's name, so a new kind (an MoE expert, say)
is one more entry in ``KINDS`` plus its matcher and its calibration step.

Each kind names its linears by a letter: weights ``w<letter>`` and biases ``b<letter>`` are the
graph's slots (``runtime/graph_packs.FFNSlots``); ``w<letter>_rows`` are the neuron-major views
(one row per neuron: the input linears' rows, the output linear's columns) that calibration and
``build_pack`` take. The last linear is the output one; those before it read x.

A folded neuron is replaced by a line of what its input linears compute:

- ``fold="line"`` (plain): ``act(z) ~ slope * z + intercept`` on the neuron's range, so the
  neuron's share of the output is linear in x through its first row;
- ``fold="constant"`` (gated): ``act(z_gate) ~ c`` (``intercept``; the slope is zero), so the
  neuron's share is ``c * (Wu x + bu)``: linear in x through its *up* row.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class FFNKind:
    """One kind of FFN (see the module docstring). ``code``: the pack meta's KIND field.

    Example:
        >>> GATED.rows, GATED.slots
        (('wg_rows', 'wu_rows', 'wd_rows'), ('wg', 'bg', 'wu', 'bu', 'wd', 'bd'))
        >>> PLAIN.bundle_row(384, 384), GATED.bundle_row(576, 576)
        (768, 1728)
    """

    name: str
    code: int
    letters: tuple[str, ...]  # one per linear, the output linear last
    fold: str  # "line" or "constant"
    # Whether calibration always fits a per-neuron mix (a constant fold is rarely good for a whole
    # FFN), or only when asked for a budget.
    always_mixed: bool
    # The guard when none is given: the one that measured best (docs/RESULTS.md): int8 on MiniLM's
    # plain FFNs (fewest bytes for its recall), int4 on SmolLM2's gated FFNs (its cheaper rows leave
    # more of the budget to exact neurons: lower perplexity at every budget).
    default_guard: str

    @property
    def rows(self) -> tuple[str, ...]:
        """Neuron-major weight names, input linears first, the output linear last."""
        return tuple(f"w{c}_rows" for c in self.letters)

    @property
    def biases(self) -> tuple[str, ...]:
        """Bias names, in the order of ``rows``."""
        return tuple(f"b{c}" for c in self.letters)

    @property
    def slots(self) -> tuple[str, ...]:
        """A graph's weight inputs for one FFN: each linear's weight then its bias."""
        return tuple(s for c in self.letters for s in (f"w{c}", f"b{c}"))

    @property
    def n_inputs(self) -> int:
        """Linears that read x (1 plain, 2 gated): the rows each neuron's bundle holds before its output column."""
        return len(self.letters) - 1

    @property
    def first_row(self) -> str:
        """The matrix the activation (and so the guard) reads: W1 or W_g."""
        return self.rows[0]

    @property
    def first_bias(self) -> str:
        return self.biases[0]

    @property
    def first_slot(self) -> str:
        return self.slots[0]

    @property
    def out_row(self) -> str:
        return self.rows[-1]

    @property
    def up_row(self) -> str | None:
        """The second input matrix (W_u), None for a one-input kind."""
        return self.rows[1] if self.n_inputs > 1 else None

    @property
    def up_bias(self) -> str | None:
        return self.biases[1] if self.n_inputs > 1 else None

    @property
    def folds_slope(self) -> bool:
        """Whether a folded neuron's slope counts (a "line" fold); a constant fold keeps only the intercept."""
        return self.fold == "line"

    @property
    def splittable(self) -> bool:
        """Whether ``compress_``'s "split" swap applies (first linear, activation module, second linear)."""
        return self.n_inputs == 1

    def bundle_row(self, d_in: int, d_out: int) -> int:
        """Elements of one neuron's bundle: its input rows and its output column."""
        return self.n_inputs * d_in + d_out

    def fold_lines(self, w: dict, slope: torch.Tensor, intercept: torch.Tensor) -> tuple:
        """(rows in, bias in, rows out, bias out, a, b) such that the folded neurons' output is
        ``rows_out^T (a * (rows_in x + bias_in) + b) + bias_out`` (``fold_ffn``'s arguments)."""
        if self.fold == "constant":  # c * (W_u x + b_u): a line of the up projection, a = c, b = 0
            return (w[self.up_row], w[self.up_bias], w[self.out_row], w[self.biases[-1]], intercept,
                    torch.zeros_like(intercept))
        return w[self.first_row], w[self.first_bias], w[self.out_row], w[self.biases[-1]], slope, intercept

    def exact_delta(self, act: Callable, z: torch.Tensor, up: torch.Tensor | None, slope: torch.Tensor,
                    intercept: torch.Tensor) -> torch.Tensor:
        """What a flagged neuron adds over its folded line: its activation minus the line's value."""
        if self.fold == "constant":
            return (act(z) - intercept) * up
        return act(z) - slope * z - intercept

    def dense(self, weights: dict, activation_fn: Callable, x: torch.Tensor) -> torch.Tensor:
        """The dense FFN on neuron-major ``weights``."""
        h = activation_fn(F.linear(x, weights[self.first_row], weights[self.first_bias]))
        if self.up_row is not None:
            h = h * F.linear(x, weights[self.up_row], weights[self.up_bias])
        return F.linear(h, weights[self.out_row].t(), weights[self.biases[-1]])


PLAIN = FFNKind("plain", 0, ("1", "2"), fold="line", always_mixed=False, default_guard="int8")
GATED = FFNKind("gated", 1, ("g", "u", "d"), fold="constant", always_mixed=True, default_guard="int4")
KINDS: dict[str, FFNKind] = {k.name: k for k in (PLAIN, GATED)}


def ffn_kind(kind: "str | FFNKind") -> FFNKind:
    """The ``FFNKind`` named ``kind`` (an ``FFNKind`` is returned as it is).

    Example:
        >>> ffn_kind("gated").n_inputs
        2
    """
    if isinstance(kind, FFNKind):
        return kind
    try:
        return KINDS[kind]
    except (KeyError, TypeError):
        raise ValueError(f"unknown FFN kind {kind!r}: one of {sorted(KINDS)}") from None
