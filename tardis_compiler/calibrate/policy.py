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

from ..accounting import mix_bytes_per_token

#: Range coverages offered to each guarded neuron.
COVERAGES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
_INF = math.inf


@dataclasses.dataclass
class NeuronOptions:
    """The options open to each of m neurons: ``error``, ``cost`` (bytes read per token) and
    ``resident`` (bytes a compressed model holds: a bundle for every neuron that can take the exact
    path, plus its guard row: ``accounting.held_bytes``) are (m, K), ``labels`` has K names. An option
    a neuron cannot take has infinite error. Without ``resident``, memory is not priced.
    ``held_fixed``: bytes held whatever the mix (Wf, bf, ``meta``...); None: the fixed bytes read."""

    labels: list[str]
    error: torch.Tensor
    cost: torch.Tensor
    resident: torch.Tensor | None = None
    held_fixed: float | None = None

    def __post_init__(self) -> None:
        shapes = [t.shape for t in (self.error, self.cost, self.resident) if t is not None]
        if len(set(shapes)) != 1 or self.error.dim() != 2 or self.error.shape[1] != len(self.labels):
            raise ValueError(f"error, cost and resident {[tuple(s) for s in shapes]} must all be "
                             f"(neurons, {len(self.labels)} options)")
        self.error = self.error.double()
        self.cost = self.cost.double()
        self.resident = self.resident.double() if self.resident is not None else None

    def scaled(self, factor: float | torch.Tensor) -> "NeuronOptions":
        """The same options with errors multiplied by ``factor`` (a number, or one per neuron of
        shape (m, 1)), to compare FFNs on one scale."""
        return NeuronOptions(self.labels, self.error * factor, self.cost, self.resident, self.held_fixed)

    def priced(self, resident_price: float) -> "NeuronOptions":
        """The same options with each one's resident bytes charged at ``resident_price`` per byte
        in its error: the inner problem of a memory-capped choice (``choose``)."""
        if not resident_price or self.resident is None:
            return self
        return NeuronOptions(self.labels, self.error + resident_price * self.resident, self.cost, self.resident,
                             self.held_fixed)


@dataclasses.dataclass
class Choice:
    """The chosen option per neuron (indices into ``labels``) and what it adds up to."""

    option: torch.Tensor  # (m,) long
    bytes: float  # fixed + per-neuron bytes per token
    error: float
    price: float  # the Lagrange multiplier that produced it
    within_budget: bool
    resident: float = math.nan  # held fixed + per-neuron resident bytes (NaN: options without them)

    def counts(self, labels: list[str]) -> dict[str, int]:
        """How many neurons took each option (options no neuron took are left out)."""
        hist = torch.bincount(self.option, minlength=len(labels))
        return {label: int(n) for label, n in zip(labels, hist.tolist()) if n}


def _pick(options: NeuronOptions, price: float, fixed_bytes: float, budget_bytes: float,
          errors: torch.Tensor | None = None) -> Choice:
    score = options.error + price * options.cost
    score = torch.where(torch.isnan(score), torch.full_like(score, math.inf), score)
    option = score.argmin(dim=1)
    cost = fixed_bytes + options.cost.gather(1, option[:, None]).sum().item()
    error = (options.error if errors is None else errors).gather(1, option[:, None]).sum().item()
    held_fixed = fixed_bytes if options.held_fixed is None else options.held_fixed
    resident = (held_fixed + options.resident.gather(1, option[:, None]).sum().item()
                if options.resident is not None else math.nan)
    return Choice(option, cost, error, price, cost <= budget_bytes * (1 + 1e-9), resident)


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


def choose(options: NeuronOptions, budget_bytes: float, fixed_bytes: float = 0.0, steps: int = 80,
           resident_bytes: float = math.inf) -> Choice:
    """Pick one option per neuron to minimise total error with ``fixed_bytes`` + chosen costs
    within ``budget_bytes`` (Lagrangian bisection, see the module docstring), and, when
    ``resident_bytes`` is finite, with the options' ``held_fixed`` (None: ``fixed_bytes``) + chosen
    resident bytes within it: a second price on memory, bisected around the first (``_cap_resident``).

    When even the cheapest options exceed the budget, returns them with ``within_budget=False``.

    Example:
        >>> opts = NeuronOptions(["exact", "folded"], error=torch.tensor([[0., 5.], [0., 1.]]),
        ...                      cost=torch.tensor([[10., 0.], [10., 0.]]))
        >>> c = choose(opts, budget_bytes=10)
        >>> c.option.tolist(), c.bytes, c.error       # the costly error gets the exact path
        ([0, 1], 10.0, 1.0)
    """
    def fit(price_of_memory: float) -> Choice:
        priced = options.priced(price_of_memory)
        return _bisect_price(lambda price: _pick(priced, price, fixed_bytes, budget_bytes, options.error), steps)

    return _cap_resident(fit, lambda c: c.resident, resident_bytes, options.resident is not None)


def _cap_resident(fit, resident_of, resident_bytes: float, priced: bool):
    """``fit(0)``, or if its resident bytes exceed ``resident_bytes``, ``fit(nu)`` at the smallest
    price ``nu`` per resident byte that brings them within (bisection on its exponent, as for the
    read price). A cap no price meets returns the most frugal fit, marked over budget."""
    best = fit(0.0)
    if not priced or resident_of(best) <= resident_bytes * (1 + 1e-9):
        return best
    lo, hi = -30.0, 30.0
    best = fit(10.0 ** hi)
    if resident_of(best) > resident_bytes * (1 + 1e-9):
        best.within_budget = False
        return best
    for _ in range(_RESIDENT_STEPS):
        mid = (lo + hi) / 2
        candidate = fit(10.0 ** mid)
        if resident_of(candidate) <= resident_bytes * (1 + 1e-9):
            best, hi = candidate, mid
        else:
            lo = mid
    return best


_RESIDENT_STEPS = 30  # bisection steps of the memory price: 2 ** -30 of 60 decades is ample


@dataclasses.dataclass
class JointChoice:
    """``choose_across``'s result: per FFN the chosen variant and its ``Choice``."""

    picks: list[tuple[int, Choice]]
    bytes: float
    error: float
    price: float
    within_budget: bool


def choose_across(ffns: list[list[tuple[NeuronOptions, float]]], budget_bytes: float,
                  steps: int = 80, resident_bytes: float = math.inf) -> list[tuple[int, Choice]]:
    """One budget shared by several FFNs. Each FFN offers variants ``(options, fixed_bytes)`` (e.g.
    with and without a folded matrix); at one common price every FFN takes its best variant and
    every neuron its best option, so bytes go where they buy the most error. A finite
    ``resident_bytes`` caps the bytes all of them hold, at one common memory price (as ``choose``).
    Returns, per FFN, the chosen variant's index and ``Choice``.

    Example:
        >>> cheap = NeuronOptions(["exact", "folded"], torch.tensor([[0., 1.]]), torch.tensor([[10., 0.]]))
        >>> costly = NeuronOptions(["exact", "folded"], torch.tensor([[0., 9.]]), torch.tensor([[10., 0.]]))
        >>> picks = choose_across([[(cheap, 0.0)], [(costly, 0.0)]], budget_bytes=10)
        >>> [choice.option.tolist() for _, choice in picks]      # the budget goes to the costly error
        [[1], [0]]
    """
    def fit(price_of_memory: float) -> JointChoice:
        priced = [[(opts.priced(price_of_memory), opts.error, fixed) for opts, fixed in variants] for variants in ffns]

        def pick(price: float) -> JointChoice:
            picks = []
            for variants in priced:
                # A variant's fixed bytes count at the same prices as its neurons' bytes.
                scored = [(c.error + price * c.bytes + price_of_memory * _or_zero(c.resident), i, c)
                          for i, (opts, errors, fixed) in enumerate(variants)
                          for c in [_pick(opts, price, fixed, math.inf, errors)]]
                _, i, c = min(scored, key=lambda t: t[:2])
                picks.append((i, c))
            total = sum(c.bytes for _, c in picks)
            return JointChoice(picks, total, sum(c.error for _, c in picks), price,
                               total <= budget_bytes * (1 + 1e-9))

        return _bisect_price(pick, steps)

    has_resident = all(opts.resident is not None for variants in ffns for opts, _ in variants)
    joint = _cap_resident(fit, lambda j: sum(c.resident for _, c in j.picks), resident_bytes, has_resident)
    for _, c in joint.picks:
        c.within_budget = joint.within_budget
    return joint.picks


def _or_zero(value: float) -> float:
    return 0.0 if math.isnan(value) else value


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
                        fixed: float, costs_of: tuple[float, float], dense_bytes: float) -> dict[str, Any]:
    """Stats of a fitted mix on held-out tokens, shared by gated and plain FFNs: coverage, and for
    ``guard`` flag rate, recall, output error and bytes per token (``fixed`` = what is read whatever
    the guard, e.g. the folded matrix and output bias; ``costs_of``: bytes an exact neuron reads,
    and a flagged guarded one).

    Example:
        >>> # stats.update(policy_measurements(flags, outside, always, guarded, dy, y, ...))
    """
    any_guarded = bool(guarded.any())
    guard_read = guarded.sum().item() * guard_cost[0] + guard_cost[1] * any_guarded
    fixed_bytes = fixed + guard_read
    exact_cost, guarded_cost = costs_of
    always_neurons = int(always.sum().item())
    corrected = flags.float().sum(1).mean().item()
    missed = outside & ~flags
    guard_stats = {
        "flag_rate": flags[:, guarded].float().mean().item() if any_guarded else 0.0,
        "corrected_rate": flags.float().mean().item(),
        "recall": 1.0 - missed.sum().item() / max(1, outside.sum().item()),
        "rel_error": (delta_y.norm() / dense_y.norm().clamp(min=1e-30)).item(),
        "max_abs_error": delta_y.abs().max().item() if delta_y.numel() else 0.0,
        "kernel": predictor.kernel if predictor is not None else guard,
        "bytes": guard_read,
        # bytes per token: accounting.mix_bytes_per_token of these (the meter's formula too)
        "fixed_bytes": fixed_bytes, "exact_cost": exact_cost, "guarded_cost": guarded_cost,
        "always_neurons": always_neurons,
    }
    guard_stats["bytes_per_token"] = per_token = mix_bytes_per_token(guard_stats, corrected)
    return {
        "coverage": 1.0 - (outside | always).float().mean().item(),  # (token, neuron) pairs the fold serves
        "guards": {guard: guard_stats},
        "bytes_fraction": per_token / dense_bytes,
    }
