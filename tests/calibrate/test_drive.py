"""drive.py: record, calibrate and calibrate_for_budget end to end, and bad input."""
import pytest
import torch

import tardis_compiler as tc
from tardis_compiler.calibrate.drive import calibrate_for_budget, record
from tests.tiny_models import build_tiny, token_batches

QUIET = tc.CalibrationConfig(progress=False, group_size=32)


def test_calibration_does_not_modify_weights():
    model = build_tiny("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tc.calibrate(model, token_batches(2), QUIET)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_empty_calibration_set_is_a_clear_error():
    with pytest.raises(ValueError, match="empty calibration set"):
        tc.calibrate(build_tiny("bert"), [], QUIET)


def test_training_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="model.eval"):
        tc.calibrate(build_tiny("bert").train(), token_batches(1), QUIET)


def test_model_without_ffn_is_a_clear_error():
    with pytest.raises(ValueError, match="found no FFN"):
        tc.calibrate(torch.nn.Linear(4, 4).eval(), [torch.randn(2, 4)], QUIET)


def test_dict_batches_are_keyword_arguments():
    batches = [{"input_ids": t, "attention_mask": torch.ones_like(t)} for t in token_batches(2)]
    assert len(tc.calibrate(build_tiny("bert"), batches, QUIET).ffns) == 2


def test_calibrate_for_budget_meets_the_budget_and_explain_agrees():
    model = build_tiny("gpt_neox")
    loose = tc.calibrate_for_budget(model, token_batches(6), 0.9, "int8", QUIET)
    tight = tc.calibrate_for_budget(model, token_batches(6), 0.7, "int8", QUIET)
    # The mix meets the budget on the fit tokens; held-out bytes may differ by the flag-rate noise.
    assert loose.bytes_fraction("int8") <= 0.9 + 0.03 and tight.bytes_fraction("int8") <= 0.7 + 0.03
    assert all(f.has_policy and f.stats["policy"]["within_budget"] for f in tight.ffns.values())
    rel_error = lambda p: sum(f.stats["guards"]["int8"]["rel_error"] for f in p.ffns.values())  # noqa: E731
    assert rel_error(tight) > rel_error(loose)
    report = tc.explain(model, token_batches(1)[0], profile=tight, guard="int8", inner="eager", dense_above=None)
    read = sum(f.bytes_tardis for f in report.ffns) / sum(f.bytes_dense for f in report.ffns)
    assert abs(read - tight.bytes_fraction("int8")) < 1e-9


@pytest.mark.parametrize("budget", [0.0, 1.5, -0.2])
def test_calibrate_for_budget_refuses_impossible_budgets(budget):
    with pytest.raises(ValueError, match="budget"):
        tc.calibrate_for_budget(build_tiny("opt"), token_batches(2), budget, "int4", QUIET)


def test_non_finite_tokens_are_dropped_with_a_warning():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    batch = torch.randn(256, 16)
    batch[3, 5] = float("nan")
    batch[7, 0] = float("inf")
    with pytest.warns(UserWarning, match="dropped up to 2 token"):
        profile = tc.calibrate(mlp, [batch], tc.CalibrationConfig(progress=False))
    ffn = profile.ffns[""]
    # Exact neurons of the default per-neuron mix carry infinite margins and line errors by
    # design; what the dropped tokens must not leave is a NaN, or a non-finite line.
    assert torch.isfinite(ffn.slope).all() and torch.isfinite(ffn.intercept).all()
    for vector in (ffn.line_error, ffn.lower, ffn.upper, *ffn.margins.values()):
        assert not vector.isnan().any()
    _assert_guard_all_is_exact(mlp, profile, torch.randn(4, 16))


def test_only_non_finite_tokens_is_a_clear_error():
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    with pytest.raises(ValueError, match="NaN or Inf"):
        tc.calibrate(mlp, [torch.full((8, 16), float("nan"))], tc.CalibrationConfig(progress=False))


def test_too_few_tokens_warn():
    from tests.tiny_models import build_tiny

    model = build_tiny("llama")
    with pytest.warns(UserWarning, match="only 1 token"):
        tc.calibrate(model, [torch.tensor([[5]])], tc.CalibrationConfig(progress=False, budget=0.5))


def test_ffns_with_tied_weights_are_calibrated_each_with_its_own_bias():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.ModuleList([torch.nn.Linear(16, 64) for _ in range(2)])
            self.down = torch.nn.ModuleList([torch.nn.Linear(64, 16) for _ in range(2)])
            self.up[1].weight = self.up[0].weight  # tied, but each layer has its own bias
            self.down[1].weight = self.down[0].weight
            with torch.no_grad():
                self.up[1].bias.add_(2.0)

        def forward(self, x):
            for up, down in zip(self.up, self.down):
                x = x + down(torch.nn.functional.gelu(up(x)))
            return x

    model = Tied().eval()
    profile = tc.calibrate(model, [torch.randn(256, 16)], tc.CalibrationConfig(progress=False))
    assert len(profile.ffns) == 2, list(profile.ffns)
    _assert_guard_all_is_exact(model, profile, torch.randn(4, 16))


def test_float64_model_with_guard_all_is_exact_to_float64_precision():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval().double()
    profile = tc.calibrate(mlp, [torch.randn(256, 16, dtype=torch.float64)], tc.CalibrationConfig(progress=False))
    fast = torch.compile(mlp, backend="tardis", options={"profile": profile, "guard": "all", "inner": "eager",
                                                          "dense_above": None})
    x = torch.randn(4, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), mlp(x), atol=1e-11, rtol=1e-11)


def test_budgets_fitted_from_one_recording_share_the_prepared_options():
    model, batches = build_tiny("llama"), token_batches(4)
    recorder = record(model, batches, tc.CalibrationConfig(progress=False))
    profiles = [calibrate_for_budget(model, batches, b, recorder=recorder) for b in (0.3, 0.6)]
    assert len(recorder.prepared) == 2  # per FFN, for one guard and config: computed once for both budgets
    fractions = [p.bytes_fraction() for p in profiles]
    assert fractions[0] <= 0.3 * 1.05 and 0.3 * 1.05 < fractions[1] <= 0.6 * 1.05


def _assert_guard_all_is_exact(model, profile, x):
    """With every neuron flagged the compiled model equals ``model`` (every token through the pack)."""
    fast = torch.compile(model, backend="tardis", options={"profile": profile, "guard": "all", "inner": "eager",
                                                           "dense_above": None})
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)
