"""The plugin on tiny random-weight models of every architecture it serves (eager mode, float32)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.vllm.helpers import PROMPTS, engine, hf_tokens, mlp_kinds, save_tiny, vllm_tokens

pytestmark = pytest.mark.vllm
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
NEW_TOKENS = 16


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """arch -> its compressed checkpoint (built on first use, once per session)."""
    folders: dict[str, Path] = {}

    def get(arch: str, guard: str | None = None, compress: bool = True) -> Path:
        key = f"{arch}-{guard}-{compress}"
        if key not in folders:
            folders[key] = save_tiny(arch, tmp_path_factory.mktemp(key), guard=guard, compress=compress)
        return folders[key]
    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_text_equals_transformers_of_the_same_checkpoint(arch, tiny):
    folder = tiny(arch)
    expected = hf_tokens(folder, PROMPTS, NEW_TOKENS, torch.float32)
    with engine(folder) as llm:
        assert mlp_kinds(llm) == {"TardisMLP": 2}  # every compressed MLP runs through the op
        assert vllm_tokens(llm, PROMPTS, NEW_TOKENS) == expected


def test_guard_all_reproduces_dense_vllm(tiny):
    dense, exact = tiny("llama", compress=False), tiny("llama", guard="all")
    with engine(dense) as llm:
        assert "TardisMLP" not in mlp_kinds(llm)
        want = vllm_tokens(llm, PROMPTS, NEW_TOKENS)
    with engine(exact) as llm:
        assert mlp_kinds(llm) == {"TardisMLP": 2}
        assert vllm_tokens(llm, PROMPTS, NEW_TOKENS) == want


def test_dense_checkpoint_is_untouched_by_the_plugin(tiny, monkeypatch):
    dense = tiny("llama", compress=False)
    with engine(dense) as llm:
        kinds, got = mlp_kinds(llm), vllm_tokens(llm, PROMPTS, NEW_TOKENS)
    monkeypatch.setenv("VLLM_PLUGINS", "")  # no plugin at all: the stock classes
    with engine(dense) as llm:
        assert mlp_kinds(llm) == kinds == {"LlamaMLP": 2}
        assert vllm_tokens(llm, PROMPTS, NEW_TOKENS) == got
    assert got == hf_tokens(dense, PROMPTS, NEW_TOKENS, torch.float32)


def test_unsupported_architecture_is_refused(tiny):
    folder = tiny("opt")  # vLLM has OPT; the plugin does not serve its (plain) FFNs
    with pytest.raises(ValueError, match=r"does not override \(architectures \['OPTForCausalLM'\]\).*transformers"):
        with engine(folder):
            pass


def test_a_split_swap_is_refused_with_what_to_do(tiny, tmp_path):
    folder = shutil.copytree(tiny("llama"), tmp_path / "split")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["modules"]["model.layers.0.mlp"]["mode"] = "split"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'split' swap is a plain FFN's first linear"):
        with engine(folder):
            pass


def test_wrong_dtype_says_which_to_load_with(tiny):
    with pytest.raises(ValueError, match=r"compressed in float32 .* load it with dtype=torch.float32"):
        with engine(tiny("llama"), dtype="bfloat16"):
            pass


def test_tensor_parallel_is_refused_before_anything_starts():
    from types import SimpleNamespace as NS

    from tardis_compiler.vllm.models import refuse_parallel

    with pytest.raises(ValueError, match="not built yet"):
        refuse_parallel(NS(parallel_config=NS(tensor_parallel_size=2, pipeline_parallel_size=1)))
