"""Shared fixtures: tiny random-weight HF models built in memory (structure and exactness tests)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import ARCHITECTURES, build_tiny  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts with dynamo's and the package's caches empty (compiled graphs, packs and
    auto-calibration states would otherwise carry over, and hide bugs that depend on them), and with
    the torch thread count it had before."""
    import tardis_compiler as tc

    threads = torch.get_num_threads()
    torch.compiler.reset()
    tc.clear_caches()
    yield
    torch.compiler.reset()
    tc.clear_caches()
    # a test that changes torch's threads must not change what later tests run ("auto" dense_above)
    torch.set_num_threads(threads)


@pytest.fixture(params=ARCHITECTURES)
def tiny_arch(request):
    """Each plain-FFN architecture of the issue, as a tiny random model in eval mode."""
    return request.param


@pytest.fixture
def tiny_model(tiny_arch):
    return build_tiny(tiny_arch)
