import itertools

import pytest
import torch

from tardis_compiler.calibrate.policy import NeuronOptions, choose


def _brute_force(opts: NeuronOptions, budget: float, fixed: float) -> float:
    best = float("inf")
    m, k = opts.error.shape
    for pick in itertools.product(range(k), repeat=m):
        cost = fixed + sum(opts.cost[i, j].item() for i, j in enumerate(pick))
        if cost <= budget:
            best = min(best, sum(opts.error[i, j].item() for i, j in enumerate(pick)))
    return best


def test_choose_meets_budget_and_is_near_optimal():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        m = 6
        cost = torch.cat([torch.full((m, 1), 10.0), torch.rand(m, 2, generator=g) * 6, torch.zeros(m, 1)], 1)
        error = torch.cat([torch.zeros(m, 1), torch.rand(m, 2, generator=g) * 3, torch.rand(m, 1, generator=g) * 5 + 3], 1)
        opts = NeuronOptions(["exact", "a", "b", "folded"], error, cost)
        budget = 2.0 + 30.0 * trial / 20
        choice = choose(opts, budget, fixed_bytes=2.0)
        assert choice.within_budget and choice.bytes <= budget + 1e-9
        optimum = _brute_force(opts, budget, 2.0)
        # Lagrangian solutions are optimal for the bytes they spend; the gap is at most one option.
        assert choice.error <= optimum + error.max().item() + 1e-9


def test_more_budget_never_costs_accuracy():
    g = torch.Generator().manual_seed(1)
    error = torch.rand(200, 4, generator=g)
    error[:, 0] = 0
    cost = torch.rand(200, 4, generator=g)
    cost[:, 0] = 1.0
    opts = NeuronOptions(["exact", "a", "b", "c"], error, cost)
    errors = [choose(opts, b).error for b in (10, 40, 80, 160, 200)]
    assert errors == sorted(errors, reverse=True)
    assert choose(opts, 200).error == 0.0  # everything exact fits


def test_infeasible_budget_returns_cheapest_and_says_so():
    opts = NeuronOptions(["exact", "folded"], torch.tensor([[0.0, 1.0]]), torch.tensor([[5.0, 1.0]]))
    choice = choose(opts, budget_bytes=0.5, fixed_bytes=0.0)
    assert not choice.within_budget and choice.option.tolist() == [1]


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="neurons, 2 options"):
        NeuronOptions(["a", "b"], torch.zeros(3, 3), torch.zeros(3, 3))


def _options_with_memory(m: int, seed: int) -> NeuronOptions:
    """exact (reads and holds 10), guarded (reads 2-6, holds 11), folded (reads and holds 0)."""
    g = torch.Generator().manual_seed(seed)
    cost = torch.cat([torch.full((m, 1), 10.0), 2 + torch.rand(m, 1, generator=g) * 4, torch.zeros(m, 1)], 1)
    resident = torch.cat([torch.full((m, 1), 10.0), torch.full((m, 1), 11.0), torch.zeros(m, 1)], 1)
    error = torch.cat([torch.zeros(m, 1), torch.rand(m, 1, generator=g), torch.rand(m, 1, generator=g) * 4 + 1], 1)
    return NeuronOptions(["exact", "guarded", "folded"], error, cost, resident)


def test_a_resident_cap_is_met_and_costs_error_only_where_it_binds():
    opts = _options_with_memory(200, 0)
    free = choose(opts, budget_bytes=600.0, fixed_bytes=5.0)
    assert free.resident > 1000  # most neurons guarded: more held than read
    for cap in (1500.0, 1000.0, 500.0):
        capped = choose(opts, budget_bytes=600.0, fixed_bytes=5.0, resident_bytes=cap)
        assert capped.within_budget and capped.bytes <= 600.0 + 1e-9
        assert capped.resident <= cap + 1e-9
        assert capped.error >= free.error - 1e-9
    assert choose(opts, 600.0, 5.0, resident_bytes=free.resident + 1).error == pytest.approx(free.error)


def test_an_unmeetable_resident_cap_says_so():
    opts = _options_with_memory(10, 1)
    choice = choose(opts, budget_bytes=100.0, fixed_bytes=5.0, resident_bytes=1.0)  # below the fixed bytes
    assert not choice.within_budget


def test_a_shared_resident_cap_spans_ffns():
    from tardis_compiler.calibrate.policy import choose_across

    layers = [[(_options_with_memory(50, s), 5.0)] for s in range(3)]
    picks = choose_across(layers, budget_bytes=450.0, resident_bytes=600.0)
    assert sum(c.resident for _, c in picks) <= 600.0 + 1e-9
    assert sum(c.bytes for _, c in picks) <= 450.0 + 1e-9
