"""The vLLM door's tier (marker ``vllm``): run in the vLLM venv (``.ci/install-vllm``)::

    .venv-vllm/bin/python -m pytest -m vllm tests/vllm

The main suite deselects the marker (pyproject's addopts). Every engine runs in this process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, executor "uni"), so a refused checkpoint raises its own
exception here, and an engine starts in seconds. Checkpoints are built once per session.
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vllm/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.vllm)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """Real SmolLM2-135M in float32: {"dense", "tardis" (budget 0.5), "exact" (guard="all")} checkpoint
    folders (tests/vllm/smollm2.py), built once per session."""
    import subprocess
    import sys
    from pathlib import Path

    # In a process of its own: loading the GGUF model in this one left vLLM's in-process engines without
    # their pipeline-parallel group ("pipeline model parallel group is not initialized" at the first step).
    root = tmp_path_factory.mktemp("smollm2")
    subprocess.run([sys.executable, "-c", "import sys, torch; from pathlib import Path; from tests.vllm.smollm2 "
                    "import build; build(Path(sys.argv[1]), torch.float32)", str(root)],
                   cwd=Path(__file__).resolve().parents[2], check=True, timeout=1800)
    return {name: root / name for name in ("dense", "tardis", "exact")}
