"""compress_(other_linears=...) -> save_pretrained -> from_pretrained: the quantized linears (attention,
the LM head) are rebuilt by the "tardis" quantizer with the very same logits; tied heads load untied;
checkpoints without them are written as before."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as T

import tardis_compiler as tc
from tardis_compiler.hf.checkpoint import checkpoint_table
from tardis_compiler.runtime.quantized_linear import QuantizedLinear
from tests.tiny_models import build_tiny, logits, token_batches

QUIET = dict(progress=False, group_size=32)


def _dense(arch: str, dtype: torch.dtype, folder, **overrides) -> torch.nn.Module:
    """The tiny model as ``from_pretrained`` gives it in ``dtype`` (its rotary tables stay float32, as
    a reloaded checkpoint's do: ``build_tiny(dtype=...)`` would cast them)."""
    model = build_tiny(arch, **overrides)
    if overrides.get("tie_word_embeddings"):
        model.tie_weights()
    model.save_pretrained(folder)
    return T.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def _compressed(arch: str, dtype: torch.dtype, folder, other: str | None, **overrides):
    model = _dense(arch, dtype, folder, **overrides)
    batches = token_batches(4)
    profile = tc.calibrate(model, batches, tc.CalibrationConfig(**QUIET))
    report = tc.compress_(model, profile, batches[0], other_linears=other)
    return model, batches, report


@pytest.mark.parametrize("arch,dtype,other", [("llama", torch.float32, "int8"), ("llama", torch.bfloat16, "int8"),
                                              ("llama", torch.float32, "int4"), ("llama", torch.bfloat16, "int4"),
                                              ("opt", torch.float32, "int8")])  # opt: linears with biases
def test_round_trip_gives_the_same_logits(arch, dtype, other, tmp_path):
    model, batches, report = _compressed(arch, dtype, tmp_path / "dense", other)
    model.save_pretrained(tmp_path / "tardis")
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "tardis", dtype=dtype)
    quantized = {name for name, m in reloaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert quantized == {q.name for q in report.quantized} and len(quantized) >= 9
    assert all(m.cpu_layout for m in reloaded.modules() if isinstance(m, QuantizedLinear) and m.bits == 4)
    with torch.no_grad():
        for x in batches[1:3]:
            torch.testing.assert_close(logits(reloaded(x)), logits(model(x)), atol=0, rtol=0)
    quant = json.loads((tmp_path / "tardis" / "config.json").read_text())["quantization_config"]
    assert set(quant["linears"]) == quantized and quant["format_version"] == 3
    size = lambda d: sum(p.stat().st_size for p in d.glob("*.safetensors"))  # noqa: E731
    assert size(tmp_path / "tardis") < 0.8 * size(tmp_path / "dense")
    reloaded.save_pretrained(tmp_path / "again")  # a loaded model saves the same checkpoint (portable codes)
    again = T.AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(logits(again(batches[1])), logits(model(batches[1])), atol=0, rtol=0)


def test_a_tied_head_loads_untied_with_the_same_logits(tmp_path):
    model, batches, report = _compressed("llama", torch.float32, tmp_path / "dense", "int8", tie_word_embeddings=True)
    assert next(q for q in report.quantized if q.name == "lm_head").tied_to == "model.embed_tokens.weight"
    model.save_pretrained(tmp_path / "tardis")
    config = json.loads((tmp_path / "tardis" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "tardis")
    assert isinstance(reloaded.lm_head, QuantizedLinear)
    assert torch.equal(reloaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded(batches[1])), logits(model(batches[1])), atol=0, rtol=0)


def test_a_checkpoint_without_other_linears_is_written_as_before(tmp_path):
    model, _, _ = _compressed("llama", torch.float32, tmp_path / "dense", None)
    model.save_pretrained(tmp_path / "tardis")
    quant = json.loads((tmp_path / "tardis" / "config.json").read_text())["quantization_config"]
    assert "linears" not in quant and quant["format_version"] == 3
    assert "linears" not in tc.TardisConfig(modules={}).to_dict()
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "tardis")
    assert not any(isinstance(m, QuantizedLinear) for m in reloaded.modules())


def test_reloaded_model_generates_and_compiles_and_explain_lists_the_linears(tmp_path):
    model, batches, _ = _compressed("llama", torch.float32, tmp_path / "dense", "int4")
    model.save_pretrained(tmp_path / "tardis")
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "tardis")
    prompt = batches[0][:1, :4]
    want = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert torch.equal(reloaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=2), want)
    config = T.CompileConfig(backend="eager", fullgraph=True)
    config._compile_all_devices = True
    compiled = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=2,
                                 cache_implementation="static", compile_config=config)
    assert torch.equal(compiled, want)
    assert "other linears: 9 quantized (9 int4)" in checkpoint_table(tmp_path / "tardis")


def test_without_tardis_a_checkpoint_of_quantized_linears_fails_to_load_loudly(tmp_path):
    model = _dense("llama", torch.float32, tmp_path / "dense")
    batches = token_batches(4)
    profile = tc.calibrate(model, batches, tc.CalibrationConfig(**QUIET, skip=[r"model\.layers\.0\.mlp"]))
    report = tc.compress_(model, profile, batches[0], other_linears="int8", skip=[r"model\.layers\.1\.mlp"])
    assert not report.compressed and len(report.quantized) == 2 * 4 + 3 + 1  # no FFN compressed: no marks
    model.save_pretrained(tmp_path / "tardis")
    code = ("import sys, transformers as T\n"
            "try:\n    T.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "except RuntimeError as e:\n    print('REFUSED', e)\nelse:\n    print('LOADED')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tardis")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 0 and "REFUSED" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "tardis")  # with tardis: fine
    with torch.no_grad():
        torch.testing.assert_close(logits(reloaded(batches[1])), logits(model(batches[1])), atol=0, rtol=0)


def test_cli_passes_other_linears_through(monkeypatch, tmp_path, capsys):
    from tardis_compiler.cli import main

    seen = {}

    def fake(model_ref, out, budget, **kwargs):
        seen.update(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr("tardis_compiler.hf.checkpoint.compress_pretrained", fake)
    assert main(["compress", "smollm2", "--out", str(tmp_path / "o"), "--other-linears", "int4"]) == 2
    assert seen["other_linears"] == "int4" and "stop here" in capsys.readouterr().err
    assert main(["compress", "smollm2", "--out", str(tmp_path / "o")]) == 2
    assert seen["other_linears"] is None
