"""The docstring examples of the vLLM plugin's modules, which the main suite skips (no vLLM there)."""
import doctest
import importlib
import pkgutil

import pytest

import tardis_compiler.vllm

pytestmark = pytest.mark.vllm
MODULES = ["tardis_compiler.vllm", *sorted(m.name for m in pkgutil.walk_packages(tardis_compiler.vllm.__path__,
                                                                                  "tardis_compiler.vllm."))]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0, f"{result.failed} docstring example(s) failed in {name}"
