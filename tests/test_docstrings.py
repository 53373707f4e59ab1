"""Every docstring example in the package runs (docs that rot are worse than none). Modules are
found by walking the package, so a new module is covered without being listed here. The eval
modules' examples run on the real MiniLM (loaded once) and on a real results file; the few that
need minutes or the causal LM are marked +SKIP in place, with the test that runs them instead."""
import doctest
import functools
import glob
import importlib
import importlib.util
import json
import pkgutil
import tempfile
from pathlib import Path

import pytest

import tardis_compiler

MODULES = sorted(m.name for m in pkgutil.walk_packages(tardis_compiler.__path__, "tardis_compiler."))
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@functools.cache
def _eval_globals() -> dict:
    """What the eval modules' examples use: MiniLM, its tokenizer, two short calibration batches,
    a results record of a real run, a scratch folder."""
    from tardis_compiler.eval.corpus import calibration_batches
    from tardis_compiler.eval.models import load_minilm

    model, tokenizer = load_minilm()
    with open(sorted(glob.glob(str(RESULTS / "eval-minilm-standard-*.json")))[-1]) as f:
        results = json.load(f)
    return {"model": model, "tokenizer": tokenizer, "results": results,
            "batches": calibration_batches(tokenizer, context_length=64, num_batches=2),
            "out_dir": Path(tempfile.mkdtemp(prefix="tardis-doctest-"))}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name.startswith("tardis_compiler.vllm.") and importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vLLM: tests/vllm/test_plugin_docs.py runs these in the vLLM venv (.ci/install-vllm)")
    module = importlib.import_module(name)
    extra = _eval_globals() if name.startswith("tardis_compiler.eval.") else None
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False,
                             extraglobs=extra)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_every_module_is_covered():
    assert "tardis_compiler.calibrate.plain" in MODULES and "tardis_compiler.runtime.cpu.kernel" in MODULES
