"""accounting.py: the byte formulas every layer prices FFNs with, in one place."""
import math

import pytest
import torch

from tardis_compiler import accounting
from tardis_compiler.accounting import (InvalidBudget, bitmask_bytes, density_for_budget, ffn_bytes_per_token,
                                        gated_dense_bytes, guard_bytes)
from tardis_compiler.eval import accounting as eval_accounting
from tardis_compiler.eval import errors as eval_errors
from tardis_compiler.runtime import layout
from tardis_compiler.runtime.guard import LowBitGuard
from tardis_compiler.runtime.svd_predictor import SVDPredictor


def test_dense_bytes():
    assert gated_dense_bytes(4, 8, 4, 2, True, True) == (2 * 8 * 4 + 8 * 4 + 16 + 4) * 2
    assert math.isfinite(gated_dense_bytes(576, 1536, 576, 4, False, False))


def test_plain_dense_bytes_count_both_matrices_and_the_biases():
    assert ffn_bytes_per_token(4, 8, 3, 2, has_bias=False) == (8 * 4 + 8 * 3) * 2
    assert ffn_bytes_per_token(4, 8, 3, 2, has_bias=True) == (8 * 4 + 8 * 3 + 8 + 3) * 2


def test_folded_plain_bytes_are_the_layout_costs_added_up():
    d_in, m, d_out, elem, rate, guard_read = 16, 64, 16, 4, 0.25, 1000
    fixed = layout.folded_matrix_bytes(d_in, d_out, elem) + layout.always_read_bytes(d_out)
    exact = layout.exact_neuron_bytes("plain", d_in, d_out, elem)
    assert ffn_bytes_per_token(d_in, m, d_out, elem, True, "int8", rate, guard_read) == \
        fixed + guard_read + 8 * m + rate * m * exact
    assert ffn_bytes_per_token(d_in, m, d_out, elem, True, "all", 1.0) == fixed + m * exact  # no guard read


def test_guard_bytes_follow_the_pack_layout_for_every_predictor():
    d_in, elem = 64, 2
    w, x = torch.randn(32, d_in), torch.randn(200, d_in)
    assert guard_bytes(None, d_in, elem) == (layout.guard_neuron_bytes("exact", d_in, elem), 0.0)
    low_bit = LowBitGuard.build(w, bits=4, group_size=32)
    assert guard_bytes(low_bit, d_in, elem) == (layout.guard_neuron_bytes("int4", d_in, elem, 32), 0.0)
    svd = SVDPredictor.build(w, x, rank=8)
    assert guard_bytes(svd, d_in, elem) == (layout.guard_neuron_bytes("svd", d_in, elem, rank=8), 8 * d_in * 4)


def test_layout_costs_and_budget_errors_have_one_home():
    for name in ("exact_neuron_bytes", "folded_matrix_bytes", "always_read_bytes", "guard_neuron_bytes"):
        assert getattr(accounting, name) is getattr(layout, name)
    assert eval_accounting.bitmask_bytes is bitmask_bytes and eval_accounting.density_for_budget is density_for_budget
    assert eval_errors.InvalidBudget is InvalidBudget


def test_density_pays_for_the_mask_bit():
    assert density_for_budget(0.5, element_size=4) == pytest.approx(0.5 - 1 / 32)
    assert density_for_budget(0.5, element_size=2) == pytest.approx(0.5 - 1 / 16)
    assert density_for_budget(1.0, element_size=4) == 1.0  # nothing pruned: stored dense


def test_budget_below_the_mask_cost_is_an_error():
    with pytest.raises(InvalidBudget, match="bitmask"):
        density_for_budget(0.03, element_size=4)
    with pytest.raises(InvalidBudget):
        density_for_budget(1.2, element_size=4)


def test_bitmask_bytes():
    assert bitmask_bytes(kept=0, positions=64, element_size=4) == 8
    assert bitmask_bytes(kept=30, positions=64, element_size=4) == 30 * 4 + 8
    assert bitmask_bytes(kept=64, positions=64, element_size=4) == 256  # dense, no mask
    assert bitmask_bytes(kept=1, positions=9, element_size=2) == 2 + 2  # mask rounds up to bytes


@pytest.mark.parametrize("kind", ["plain", "gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("guard,bundles", [("int4", "int8"), ("int8", "dense"), ("svd", "int8"), ("exact", "dense")])
def test_held_bytes_price_what_the_layout_holds(kind, dtype, guard, bundles):
    """Calibration's memory price (linear in the mix) is Layout.resident_bytes, up to the alignment
    padding it bounds from above: never less, at most 78 bytes more."""
    d_in, d_out, m, group, rank = 40, 24, 96, 16, 5 if guard == "svd" else 0
    elem = torch.empty(0, dtype=dtype).element_size()
    for has_wf in (True, False):
        fixed = accounting.held_fixed_bytes(d_in, d_out, elem, has_wf, guard, bundles, rank)
        exact = accounting.held_neuron_bytes(kind, d_in, d_out, elem)
        guarded = accounting.held_neuron_bytes(kind, d_in, d_out, elem, guard, bundles, group, rank)
        for k_guard, k_always in ((1, 0), (3, 7), (37, 2), (96, 0)):
            lay = layout.Layout(kind, "silu", dtype, d_in, d_out, m, k_guard, k_always, guard, group, rank, has_wf,
                                bundles)
            priced = fixed + k_guard * guarded + k_always * exact
            assert 0 <= priced - lay.resident_bytes() <= 15 + 63, (has_wf, k_guard, k_always)
        always_only = layout.Layout(kind, "silu", dtype, d_in, d_out, m, 0, 9, "none", group, 0, has_wf)
        assert accounting.held_fixed_bytes(d_in, d_out, elem, has_wf) + 9 * exact == always_only.resident_bytes()
