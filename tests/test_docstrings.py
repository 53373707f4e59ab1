"""Every docstring example in the package runs (docs that rot are worse than none). Modules are
found by walking the package, so a new module is covered without being listed here."""
import doctest
import importlib
import pkgutil

import pytest

import tardis_compiler

MODULES = sorted(m.name for m in pkgutil.walk_packages(tardis_compiler.__path__, "tardis_compiler."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_every_module_is_covered():
    assert "tardis_compiler.calibrate_plain" in MODULES and "tardis_compiler.runtime.cpu.kernel" in MODULES
