"""eval/accounting.py: a method's FFN bytes (the formulas are tests/test_accounting.py's)."""
from tardis_compiler.eval.accounting import FFNBytes


def test_fractions_and_dict():
    ffn = FFNBytes(read_per_token=25.0, resident=100, dense=200)
    assert ffn.read_fraction == 0.125 and ffn.resident_fraction == 0.5
    assert ffn.to_dict()["ffn_read_bytes_per_token"] == 25.0
