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


def test_pipeline_parallel_is_refused_before_anything_starts():
    from types import SimpleNamespace as NS

    from tardis_compiler.vllm.models import refuse_parallel

    refuse_parallel(NS(parallel_config=NS(tensor_parallel_size=2, pipeline_parallel_size=1)))  # served
    with pytest.raises(ValueError, match="pipeline_parallel_size=1 only"):
        refuse_parallel(NS(parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=2)))


def _tp_run(folder: Path, tp: int) -> dict:
    import os
    import subprocess
    import sys

    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # apply_model
           "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i) for i in range(tp)) if tp > 1 else "0"}
    done = subprocess.run([sys.executable, "-m", "tests.vllm.tp_worker", str(folder), str(tp)], env=env,
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parents[2])
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, done.stderr[-3000:]
    return json.loads(lines[-1])


@pytest.mark.slow  # two multi-process engines: minutes on 2 cores (run: -m "vllm and slow" -k tensor_parallel)
def test_tensor_parallel_two_ranks_give_the_one_rank_text(tmp_path):
    """Each rank keeps half of every pack's neurons and Wf's columns; the all-reduce sums them.
    A tiny 4-head Llama (SmolLM2's 9 heads do not split in two), eager, one core per rank."""
    import tardis_compiler as tc
    from tests.tiny_models import build_tiny, token_batches

    model = build_tiny("llama", hidden_size=128, head_dim=32, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=512)
    batches = token_batches(4)
    profile = tc.calibrate(model, batches, tc.CalibrationConfig(progress=False, group_size=32, budget=0.5))
    tc.compress_(model, profile, batches[0], dense_above=-1)  # the guarded paths at every batch size
    folder = tmp_path / "tp"
    model.save_pretrained(folder)
    one, two = _tp_run(folder, 1), _tp_run(folder, 2)
    assert one["tokens"] == hf_tokens(folder, PROMPTS, NEW_TOKENS, torch.float32)
    assert two["tokens"] == one["tokens"]
    (whole,), ranks = one["held"], two["held"]
    assert len(ranks) == 2
    for layer, (k, nbytes) in enumerate(whole):  # the neurons split between the ranks, each holding about half
        assert ranks[0][layer][0] + ranks[1][layer][0] == k
        assert all(rank[layer][1] < 0.6 * nbytes for rank in ranks), (ranks, whole)


def test_keep_dense_checkpoint_runs_calls_above_dense_above_dense(tmp_path):
    """compress_(keep_dense=True): the FFN's own linears load beside the pack; with dense_above=0 every
    call runs them, so the served text is the dense model's."""
    import tardis_compiler as tc
    from tests.tiny_models import token_batches
    from tests.vllm.helpers import tiny_model

    dense = tiny_model("llama")
    dense.save_pretrained(tmp_path / "dense")
    model = tiny_model("llama")
    batches = token_batches(4)
    profile = tc.calibrate(model, batches, tc.CalibrationConfig(progress=False, group_size=32))
    tc.compress_(model, profile, batches[0], keep_dense=True, dense_above=0)
    model.save_pretrained(tmp_path / "kept")
    with engine(tmp_path / "kept") as llm:
        assert mlp_kinds(llm) == {"TardisMLP": 2}
        assert vllm_tokens(llm, PROMPTS, NEW_TOKENS) == hf_tokens(tmp_path / "dense", PROMPTS, NEW_TOKENS,
                                                                  torch.float32)


def test_a_pack_alone_runs_calls_above_dense_above_with_every_bundle_exact(tmp_path):
    """Without kept weights, dense_above=0 sends every call (prefill, each decode step) through the
    kernel's exact_all mode (int8 bundles), in vLLM's batches as in transformers' single prompts: the
    same text at both doors. The guarded checkpoint of the same profile beside it, likewise."""
    import tardis_compiler as tc
    from tests.tiny_models import token_batches
    from tests.vllm.helpers import tiny_model

    batches = token_batches(4)
    for name, above in (("exact-above", 0), ("guarded", -1)):
        model = tiny_model("llama")
        profile = tc.calibrate(model, batches, tc.CalibrationConfig(progress=False, group_size=32, budget=0.5))
        tc.compress_(model, profile, batches[0], dense_above=above)
        model.save_pretrained(tmp_path / name)
    served = {}
    for name in ("exact-above", "guarded"):
        with engine(tmp_path / name) as llm:
            served[name] = vllm_tokens(llm, PROMPTS, NEW_TOKENS)
    assert served["exact-above"] == hf_tokens(tmp_path / "exact-above", PROMPTS, NEW_TOKENS, torch.float32)
    assert served["guarded"] == hf_tokens(tmp_path / "guarded", PROMPTS, NEW_TOKENS, torch.float32)


@pytest.mark.parametrize("encoding", ["int8", "int4"])
def test_quantized_pack_checkpoints_equal_transformers(encoding, tmp_path):
    """Packs of int8 / int4 weights (tardis over int8 / int4) load and run in vLLM as in transformers."""
    import tardis_compiler as tc
    from tests.tiny_models import token_batches
    from tests.vllm.helpers import tiny_model

    batches = token_batches(4)
    model = tiny_model("llama")
    config = tc.CalibrationConfig(progress=False, group_size=32, budget=0.5, weights=encoding)
    tc.compress_(model, tc.calibrate(model, batches, config), batches[0], dense_above=-1)
    model.save_pretrained(tmp_path)
    with engine(tmp_path) as llm:
        assert mlp_kinds(llm) == {"TardisMLP": 2}
        assert vllm_tokens(llm, PROMPTS, NEW_TOKENS) == hf_tokens(tmp_path, PROMPTS, NEW_TOKENS, torch.float32)
