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
def smollm2_tardis(tmp_path_factory):
    """dtype -> real SmolLM2 compressed at budget 0.5 in that dtype (``tardis compress``), built once."""
    from tests.vllm.smollm2 import build

    folders = {}

    def get(dtype, budget: float | None = 0.5, guard: str | None = None):
        key = (dtype, budget, guard)
        if key not in folders:
            folders[key] = build(tmp_path_factory.mktemp(f"smollm2-{budget}-{guard}") / "ckpt", dtype, budget, guard)
        return folders[key]
    return get
