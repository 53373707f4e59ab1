"""Real SmolLM2-135M (float32) through the vLLM door, against transformers' ``from_pretrained`` of the same
checkpoint: 8 prompts, 64 greedy tokens each (tests/vllm/smollm2.py).

What can be token-identical, and what cannot (docs/vllm.md, "Agreement with transformers"): vLLM's
attention and norm kernels round differently from transformers' (dense float32: log-probs within 3e-5,
text identical). A compressed FFN is discontinuous in its input (a neuron's guard flags it or not), so
at budget 0.5 such rounding differences flip guard decisions and the texts part after 9-35 tokens. So:
the exact checkpoint (``guard="all"``, continuous) must give transformers' text and dense vLLM's text; at
budget 0.5 every compressed MLP must compute, on the inputs vLLM gives it, bit for bit what the
transformers module of the same checkpoint computes on them.
"""
from __future__ import annotations

import pytest
import torch
import transformers as T

from tests.vllm.helpers import engine, hf_tokens, mlp_kinds, vllm_tokens
from tests.vllm.smollm2 import NEW_TOKENS, PROMPTS, agreement, prompt_ids

# Slow tier: SmolLM2 checkpoints take minutes to build and each engine start is seconds to a minute.
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_exact_checkpoint_gives_transformers_text_and_dense_vllm_text(smollm2):
    ids = prompt_ids(smollm2["exact"])
    assert len(ids) == len(PROMPTS) >= 8
    expected = hf_tokens(smollm2["exact"], ids, NEW_TOKENS, torch.float32)
    with engine(smollm2["exact"], max_model_len=256) as llm:
        assert mlp_kinds(llm) == {"TardisMLP": 30}
        got = vllm_tokens(llm, ids, NEW_TOKENS)
    assert [len(t) for t in got] == [NEW_TOKENS] * len(PROMPTS)
    assert got == expected
    with engine(smollm2["dense"], max_model_len=256) as llm:
        assert mlp_kinds(llm) == {"LlamaMLP": 30}
        assert vllm_tokens(llm, ids, NEW_TOKENS) == got


def _record_mlps(model: torch.nn.Module) -> None:
    from tardis_compiler.vllm.mlp import TardisMLP

    model._tardis_calls = calls = []
    for name, module in model.named_modules():
        if isinstance(module, TardisMLP):
            module.register_forward_hook(
                lambda mod, args, out, name=name: calls.append((name, args[0].detach().clone(), out.detach().clone())))


def test_every_compressed_mlp_computes_what_transformers_computes(smollm2):
    folder = smollm2["tardis"]
    ids = prompt_ids(folder)[:2]
    with engine(folder, max_model_len=256) as llm:
        assert mlp_kinds(llm) == {"TardisMLP": 30}
        llm.apply_model(_record_mlps)
        vllm_tokens(llm, ids, 4)  # a prefill of both prompts, then decode steps
        calls = llm.apply_model(lambda model: model._tardis_calls)[0]
    assert {name for name, _, _ in calls} == {f"model.layers.{i}.mlp" for i in range(30)}
    assert {x.shape[0] for _, x, _ in calls} >= {len(ids), sum(map(len, ids))}  # decode steps, the prefill
    reference = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, x, y in calls:
            assert torch.equal(reference.get_submodule(name)(x), y), name


@pytest.mark.slow
def test_compiled_mode_keeps_the_exact_checkpoint_on_transformers_text(smollm2, record_property):
    """vLLM's default mode (inductor; the op stays an extern call): the first differing token of each
    prompt is recorded; the first 16 tokens of every prompt must agree."""
    result = agreement(smollm2["exact"], torch.float32, enforce_eager=False)
    record_property("first_difference", result["batched"])
    assert all(d is None or d >= 16 for d in result["batched"]), result["batched"]
