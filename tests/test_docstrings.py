"""Every docstring example in the core modules runs (docs that rot are worse than none)."""
import doctest
import importlib

import pytest

MODULES = [
    "tardis_compiler.activations", "tardis_compiler.config", "tardis_compiler.profile", "tardis_compiler.calibrate",
    "tardis_compiler.backend", "tardis_compiler.explain", "tardis_compiler.report", "tardis_compiler.passes.find_ffns",
    "tardis_compiler.runtime.ffn_op", "tardis_compiler.runtime.pack", "tardis_compiler.runtime.guard",
    "tardis_compiler.runtime.layout", "tardis_compiler.runtime.pack_cache", "tardis_compiler.runtime.torch_path",
    "tardis_compiler.runtime.graph_packs", "tardis_compiler.runtime.cpu.kernel", "tardis_compiler.runtime.cpu.build",
    "tardis_compiler.runtime.stats", "tardis_compiler.passes.find_gated_ffns", "tardis_compiler.caches",
    "tardis_compiler.calibrate_gated", "tardis_compiler.policy",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"
