"""accounting.py: the bitmask format convention and the density it implies for a budget."""
import pytest

from tardis_compiler.eval.accounting import FFNBytes, bitmask_bytes, density_for_budget
from tardis_compiler.eval.errors import InvalidBudget


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


def test_fractions_and_dict():
    ffn = FFNBytes(read_per_token=25.0, resident=100, dense=200)
    assert ffn.read_fraction == 0.125 and ffn.resident_fraction == 0.5
    assert ffn.to_dict()["ffn_read_bytes_per_token"] == 25.0
