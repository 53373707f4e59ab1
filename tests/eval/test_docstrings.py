"""Every docstring example in tardis_compiler.eval and the CLI runs (examples that need a loaded
real model are marked +SKIP in place; the rest must pass)."""
import doctest
import importlib

import pytest

from tests.eval.helpers import needs_gensim, needs_olmo

MODULES = ["accounting", "activation_sparsity", "calibration_stats", "config", "corpus", "errors",
           "ffn", "harness", "methods", "metrics", "models", "packages", "plot", "pruning",
           "report", "tasks", "wiki"]


@needs_gensim
@needs_olmo
@pytest.mark.parametrize("name", [f"tardis_compiler.eval.{m}" for m in MODULES]
                         + ["tardis_compiler.cli"])
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
