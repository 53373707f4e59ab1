"""Shared fixtures: tiny random-weight HF models built in memory (structure and exactness tests)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import ARCHITECTURES, build_tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts with dynamo's caches empty (compiled graphs are reused otherwise)."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.fixture(params=ARCHITECTURES)
def tiny_arch(request):
    """Each plain-FFN architecture of the issue, as a tiny random model in eval mode."""
    return request.param


@pytest.fixture
def tiny_model(tiny_arch):
    return build_tiny(tiny_arch)
