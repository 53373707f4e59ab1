"""methods.py: the registry, and the dense reference."""
import pytest

from tardis_compiler.eval import methods
from tardis_compiler.eval.accounting import FFNBytes, PreparedModel


def test_builtin_methods_in_order():
    assert methods.method_names()[:4] == ["dense", "wanda", "ria", "teal"]
    assert methods.get_method("dense").uses_budget is False
    assert methods.get_method("teal").uses_budget is True


def test_register_is_one_call_and_names_are_checked():
    def halve(model, batches, budget):
        return PreparedModel(model, FFNBytes(budget * 10, 10, 10))

    methods.register_method("halve", halve)
    try:
        assert methods.get_method("halve").fn is halve
        with pytest.raises(ValueError, match="already registered"):
            methods.register_method("halve", halve)
        methods.register_method("halve", halve, replace=True)
    finally:
        methods.unregister_method("halve")
    assert "halve" not in methods.method_names()
    with pytest.raises(ValueError, match="letters, digits"):
        methods.register_method("bad name", halve)
    with pytest.raises(TypeError):
        methods.register_method("notcallable", 3)
    with pytest.raises(ValueError, match="registered"):
        methods.get_method("nope")


def test_dense_reads_and_holds_everything(llama):
    prepared = methods.dense(llama, [], 1.0)
    assert prepared.model is llama
    assert prepared.ffn_bytes.read_fraction == prepared.ffn_bytes.resident_fraction == 1.0
