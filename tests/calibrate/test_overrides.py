"""Per-FFN options by name or regex: skip (left dense everywhere) and budget overrides."""
import pytest
import torch

import tardis_compiler as tc
from tests.tiny_models import build_tiny, logits, token_batches

QUIET = dict(progress=False, group_size=32)
FIRST = r"model\.layers\.0\.mlp"


def test_budget_overrides_give_matching_ffns_their_own_budget():
    model = build_tiny("llama")
    config = tc.CalibrationConfig(**QUIET, budget=0.4, budgets={FIRST: 0.9})
    profile = tc.calibrate(model, token_batches(4), config)
    fractions = {name: ffn.stats["bytes_fraction"] for name, ffn in profile.ffns.items()}
    assert fractions["model.layers.0.mlp"] == pytest.approx(0.9, abs=0.02)
    assert fractions["model.layers.1.mlp"] == pytest.approx(0.4, abs=0.02)


def test_skipped_ffns_are_not_fitted_and_stay_dense_in_both_front_doors():
    model = build_tiny("llama")
    batches = token_batches(4)
    profile = tc.calibrate(model, batches, tc.CalibrationConfig(**QUIET, skip=[FIRST]))
    assert list(profile.ffns) == ["model.layers.1.mlp"]
    report = tc.explain(model, batches[0], profile=profile, inner="eager")
    rows = {row.name: row for graph in report.graphs for row in graph.ffns}
    assert rows["model.layers.0.mlp"].status == "dense" and "calibration's skip" in rows["model.layers.0.mlp"].reason
    assert rows["model.layers.1.mlp"].status == "rewritten"
    compiled = torch.compile(model, backend="tardis", options={"profile": profile, "inner": "eager"})
    with torch.no_grad():
        assert logits(compiled(batches[1])).shape == logits(model(batches[1])).shape
    compressed = tc.compress_(model, profile, batches[0])
    assert [f.mode for f in compressed.ffns] == ["dense", "module"]
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


def test_override_mistakes_are_clear_errors():
    with pytest.raises(ValueError, match="not a valid regex"):
        tc.CalibrationConfig(skip=["model.layers.(0"])
    with pytest.raises(ValueError, match=r"budgets\['x'\] must be a number in \(0, 1\]"):
        tc.CalibrationConfig(budgets={"x": 1.5})
    with pytest.raises(ValueError, match="need allocation='layer'"):
        tc.CalibrationConfig(budgets={"x": 0.5}, allocation="model")
    config = tc.CalibrationConfig(skip=FIRST, budgets={FIRST: 0.7})
    assert tc.CalibrationConfig.from_dict(config.to_dict()) == config
