"""The per-neuron policy under a bytes budget (DESIGN section 1.4), shared by both FFN kinds.

Every neuron of an FFN takes one of a few options, each with a calibration error (its expected
squared contribution to the FFN's output error per token) and a cost (weight bytes read per token):

- ``exact``: always computed exactly (FFSplit's heavy hitters): no error, the most bytes;
- ``guarded@p``: folded on a range holding a share p of its calibration inputs; the guard flags it
  for the exact path outside that range: the guard's row plus the flagged share of the exact cost;
- ``folded``: folded everywhere, no guard: nothing read beyond the shared folded matrix;
- ``dropped``: contributes nothing (a folded constant of zero), for layers without a folded matrix.

Choosing one option per neuron to minimise the summed error within a byte budget is a
multiple-choice knapsack. We solve its Lagrangian relaxation: at a price ``lam`` per byte each
neuron independently takes the option minimising ``error + lam * cost``; total bytes fall as the
price rises, so a bisection on ``lam`` finds the cheapest price that fits the budget. The result is
optimal for the bytes it spends (the usual knapsack duality gap is at most one neuron's option).

Each FFN kind builds its options (``plain.py``: lines, ``gated.py``: constants, at the coverages
``COVERAGES``); ``encode_choice`` turns the chosen ones into the fused op's per-neuron params and
``policy_measurements`` measures the result on held-out tokens.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

#: Range coverages offered to each guarded neuron.
COVERAGES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
_INF = math.inf


@dataclasses.dataclass
class NeuronOptions:
    """The options open to each of m neurons: ``error`` and ``cost`` are (m, K), ``labels`` has K
    names. An option a neuron cannot take has infinite error."""

    labels: list[str]
    error: torch.Tensor
    cost: torch.Tensor

    def __post_init__(self) -> None:
        if self.error.shape != self.cost.shape or self.error.dim() != 2 or self.error.shape[1] != len(self.labels):
            raise ValueError(f"error {tuple(self.error.shape)} and cost {tuple(self.cost.shape)} must both be "
                             f"(neurons, {len(self.labels)} options)")
        self.error = self.error.double()
        self.cost = self.cost.double()

    def scaled(self, factor: float) -> "NeuronOptions":
        """The same options with errors multiplied by ``factor`` (to compare FFNs on one scale)."""
        return NeuronOptions(self.labels, self.error * factor, self.cost)


@dataclasses.dataclass
class Choice:
    """The chosen option per neuron (indices into ``labels``) and what it adds up to."""

    option: torch.Tensor  # (m,) long
    bytes: float  # fixed + per-neuron bytes per token
    error: float
    price: float  # the Lagrange multiplier that produced it
    within_budget: bool

    def counts(self, labels: list[str]) -> dict[str, int]:
        """How many neurons took each option (options no neuron took are left out)."""
        hist = torch.bincount(self.option, minlength=len(labels))
        return {label: int(n) for label, n in zip(labels, hist.tolist()) if n}


def _pick(options: NeuronOptions, price: float, fixed_bytes: float, budget_bytes: float) -> Choice:
    score = options.error + price * options.cost
    score = torch.where(torch.isnan(score), torch.full_like(score, math.inf), score)
    option = score.argmin(dim=1)
    cost = fixed_bytes + options.cost.gather(1, option[:, None]).sum().item()
    error = options.error.gather(1, option[:, None]).sum().item()
    return Choice(option, cost, error, price, cost <= budget_bytes * (1 + 1e-9))


def _bisect_price(pick, steps: int):
    """The cheapest price whose pick fits (``pick(price).within_budget``), by bisection on its
    exponent: prices span many decades, since errors and bytes have unrelated units."""
    best = pick(0.0)
    if best.within_budget:
        return best
    lo, hi = -60.0, 60.0
    best = pick(10.0 ** hi)
    if not best.within_budget:
        return best
    for _ in range(steps):
        mid = (lo + hi) / 2
        candidate = pick(10.0 ** mid)
        if candidate.within_budget:
            best, hi = candidate, mid
        else:
            lo = mid
    return best


def choose(options: NeuronOptions, budget_bytes: float, fixed_bytes: float = 0.0, steps: int = 80) -> Choice:
    """Pick one option per neuron to minimise total error with ``fixed_bytes`` + chosen costs
    within ``budget_bytes`` (Lagrangian bisection, see the module docstring).

    When even the cheapest options exceed the budget, returns them with ``within_budget=False``.

    Example:
        >>> opts = NeuronOptions(["exact", "folded"], error=torch.tensor([[0., 5.], [0., 1.]]),
        ...                      cost=torch.tensor([[10., 0.], [10., 0.]]))
        >>> c = choose(opts, budget_bytes=10)
        >>> c.option.tolist(), c.bytes, c.error       # the costly error gets the exact path
        ([0, 1], 10.0, 1.0)
    """
    return _bisect_price(lambda price: _pick(options, price, fixed_bytes, budget_bytes), steps)


@dataclasses.dataclass
class JointChoice:
    """``choose_across``'s result: per FFN the chosen variant and its ``Choice``."""

    picks: list[tuple[int, Choice]]
    bytes: float
    error: float
    price: float
    within_budget: bool


def choose_across(ffns: list[list[tuple[NeuronOptions, float]]], budget_bytes: float,
                  steps: int = 80) -> list[tuple[int, Choice]]:
    """One budget shared by several FFNs. Each FFN offers variants ``(options, fixed_bytes)`` (e.g.
    with and without a folded matrix); at one common price every FFN takes its best variant and
    every neuron its best option, so bytes go where they buy the most error. Returns, per FFN,
    the chosen variant's index and ``Choice``.

    Example:
        >>> cheap = NeuronOptions(["exact", "folded"], torch.tensor([[0., 1.]]), torch.tensor([[10., 0.]]))
        >>> costly = NeuronOptions(["exact", "folded"], torch.tensor([[0., 9.]]), torch.tensor([[10., 0.]]))
        >>> picks = choose_across([[(cheap, 0.0)], [(costly, 0.0)]], budget_bytes=10)
        >>> [choice.option.tolist() for _, choice in picks]      # the budget goes to the costly error
        [[1], [0]]
    """
    def pick(price: float) -> JointChoice:
        picks = []
        for variants in ffns:
            # A variant's fixed bytes count at the same price as its neurons' bytes.
            scored = [(c.error + price * c.bytes, i, c) for i, (opts, fixed) in enumerate(variants)
                      for c in [_pick(opts, price, fixed, math.inf)]]
            _, i, c = min(scored, key=lambda t: t[:2])
            picks.append((i, c))
        total = sum(c.bytes for _, c in picks)
        return JointChoice(picks, total, sum(c.error for _, c in picks), price, total <= budget_bytes * (1 + 1e-9))

    joint = _bisect_price(pick, steps)
    for _, c in joint.picks:
        c.within_budget = joint.within_budget
    return joint.picks


def encode_choice(opts: NeuronOptions, plan: dict, choice: Choice, m: int,
                  values: tuple[str, ...] = ("c",)) -> dict[str, torch.Tensor]:
    """Per-neuron ``values`` (the constant c, or a line's slope and intercept), range and margin
    encoding the chosen options for the fused op: exact neurons get an empty range (+inf, -inf) and
    zero values, so every guard flags them; folded and dropped neurons an unbounded one, so none does.

    Example:
        >>> # encode_choice(opts, plan, choose(opts, budget), m)["lower"]
    """
    out = {key: torch.zeros(m) for key in (*values, "margin")}
    out["lower"], out["upper"] = torch.full((m,), _INF), torch.full((m,), -_INF)
    for k, label in enumerate(opts.labels):
        sel = choice.option == k
        if label == "exact" or not sel.any():
            continue
        for key in values:
            out[key][sel] = plan[label][key][sel]
        if label.startswith("guarded"):
            for key in ("lower", "upper", "margin"):
                out[key][sel] = plan[label][key][sel]
        else:
            out["lower"][sel], out["upper"][sel] = -_INF, _INF
    return out


def policy_measurements(flags: torch.Tensor, outside: torch.Tensor, always: torch.Tensor, guarded: torch.Tensor,
                        delta_y: torch.Tensor, dense_y: torch.Tensor, predictor, guard: str, guard_cost: tuple,
                        fixed: float, exact_cost: float, dense_bytes: float) -> dict[str, Any]:
    """Stats of a fitted mix on held-out tokens, shared by gated and plain FFNs: coverage, and for
    ``guard`` flag rate, recall, output error and bytes per token (``fixed`` = what is read whatever
    the guard, e.g. the folded matrix and output bias).

    Example:
        >>> # stats.update(policy_measurements(flags, outside, always, guarded, dy, y, ...))
    """
    any_guarded = bool(guarded.any())
    guard_read = guarded.sum().item() * guard_cost[0] + guard_cost[1] * any_guarded
    fixed_bytes = fixed + guard_read
    per_token = fixed_bytes + flags.float().sum(1).mean().item() * exact_cost
    missed = outside & ~flags
    guard_stats = {
        "flag_rate": flags[:, guarded].float().mean().item() if any_guarded else 0.0,
        "corrected_rate": flags.float().mean().item(),
        "recall": 1.0 - missed.sum().item() / max(1, outside.sum().item()),
        "rel_error": (delta_y.norm() / dense_y.norm().clamp(min=1e-30)).item(),
        "max_abs_error": delta_y.abs().max().item() if delta_y.numel() else 0.0,
        "kernel": predictor.kernel if predictor is not None else guard,
        "bytes": guard_read, "bytes_per_token": per_token,
        # bytes per token = fixed_bytes + corrected_rate * m * exact_cost (the meter's formula)
        "fixed_bytes": fixed_bytes, "exact_cost": exact_cost,
    }
    return {
        "coverage": 1.0 - (outside | always).float().mean().item(),  # (token, neuron) pairs the fold serves
        "guards": {guard: guard_stats},
        "bytes_fraction": per_token / dense_bytes,
    }
