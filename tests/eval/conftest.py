"""Fixtures for the evaluation-harness tests (helpers live in tests/eval/helpers.py)."""
from __future__ import annotations

import pytest
import torch

from tests.eval.helpers import tiny_bert, tiny_llama

torch.set_num_threads(min(2, torch.get_num_threads()))  # share the CPU politely


@pytest.fixture
def llama() -> torch.nn.Module:
    return tiny_llama()


@pytest.fixture
def bert() -> torch.nn.Module:
    return tiny_bert()


@pytest.fixture
def batches() -> list[torch.Tensor]:
    """Four unpadded [1, 16] calibration batches of random token ids (< 128)."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (1, 16), generator=generator) for _ in range(4)]
