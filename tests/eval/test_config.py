"""config.py: presets, validation with clear messages, dict round trip."""
import pytest

from tardis_compiler.eval.config import PRESETS, EvalConfig
from tardis_compiler.eval.errors import InvalidBudget


def test_presets_set_sizes_and_overrides_win():
    quick = EvalConfig.from_preset("quick", model="minilm", task_limit=3)
    assert quick.preset == "quick" and quick.model == "minilm"
    assert quick.ppl_windows == PRESETS["quick"]["ppl_windows"] and quick.task_limit == 3
    assert EvalConfig.from_preset("full").task_limit is None


def test_budgets_are_validated_sorted_and_deduplicated():
    assert EvalConfig(budgets=(0.7, 0.3, 0.7)).budgets == (0.3, 0.7)
    with pytest.raises(InvalidBudget):
        EvalConfig(budgets=(0.5, 1.5))
    with pytest.raises(InvalidBudget):
        EvalConfig(budgets=(0.0,))


@pytest.mark.parametrize("bad, message", [
    ({"model": "gpt5"}, "neither a built-in"),
    ({"tasks": ("piqa", "mmlu")}, "unknown task"),
    ({"ppl_windows": 0}, "ppl_windows"),
    ({"context_length": 4}, "context_length"),
    ({"budgets": ()}, "at least one budget"),
    ({"methods": ()}, "at least one method"),
])
def test_bad_values_name_the_field(bad, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(**bad)


def test_round_trip_and_did_you_mean():
    config = EvalConfig.from_preset("quick", budgets=(0.5,), methods=("dense", "wanda"))
    assert EvalConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="Did you mean 'budgets'"):
        EvalConfig.from_dict({"budget": (0.5,)})
    with pytest.raises(ValueError, match="unknown preset"):
        EvalConfig.from_preset("huge")
