"""Calibration: interval and line fits, the token reservoir, what is measured, and bad input."""
import pytest
import torch

import tardis_compiler as tc
from tardis_compiler.calibrate import FFNRecord, fit_lines, max_line_error, shortest_intervals
from tests.tiny_models import build_tiny, token_batches

QUIET = tc.CalibrationConfig(progress=False, group_size=32)


def test_shortest_interval_covers_fraction():
    z = torch.randn(1000, 3)
    lo, hi = shortest_intervals(z, 0.8)
    inside = ((z >= lo) & (z <= hi)).float().mean(0)
    assert torch.all(inside >= 0.8) and torch.all(inside <= 0.81)
    lo_wide, hi_wide = shortest_intervals(z, 0.95)
    assert torch.all(hi_wide - lo_wide >= hi - lo)


def test_line_fit_recovers_a_line_and_ignores_out_of_range_points():
    z = torch.linspace(-3, 3, 601)[:, None]
    y = torch.where(z.abs() <= 1, 2 * z - 1, torch.full_like(z, 100.0))
    a, c = fit_lines(z, y, torch.tensor([-1.0]), torch.tensor([1.0]))
    assert abs(a.item() - 2) < 1e-5 and abs(c.item() + 1) < 1e-5


def test_max_line_error_of_relu_chord():
    err = max_line_error(torch.relu, torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([-1.0]), torch.tensor([1.0]))
    assert abs(err.item() - 0.5) < 1e-6  # the chord of relu on [-1, 1] is 0.5 z + 0.5; worst at z = 0


def test_reservoir_keeps_at_most_max_tokens_from_all_batches():
    rec = FFNRecord("f", "p", "gelu", {}, max_tokens=64, seed=0)
    for i in range(10):
        rec.add(torch.full((32, 4), float(i)))
    kept = rec.tokens()
    assert kept.shape == (64, 4) and rec.seen == 320
    assert len(set(kept[:, 0].tolist())) > 3  # later batches are represented


def test_profile_measures_coverage_flag_rate_and_recall():
    profile = tc.calibrate(build_tiny("opt"), token_batches(6), QUIET)
    assert len(profile.ffns) == 2
    ffn = profile.ffns["model.decoder.layers.0"]
    assert 0.75 < ffn.stats["coverage"] < 0.95
    int4 = ffn.stats["guards"]["int4"]
    assert int4["recall"] > 0.98 and int4["flag_rate"] >= 1 - ffn.stats["coverage"] - 0.02
    assert ffn.stats["guards"]["exact"]["recall"] == 1.0
    assert ffn.stats["error_bound"] > 0


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
    report = tc.explain(model, token_batches(1)[0], profile=tight, guard="int8", inner="eager")
    read = sum(f.bytes_tardis for f in report.ffns) / sum(f.bytes_dense for f in report.ffns)
    assert abs(read - tight.bytes_fraction("int8")) < 1e-9


@pytest.mark.parametrize("budget", [0.0, 1.5, -0.2])
def test_calibrate_for_budget_refuses_impossible_budgets(budget):
    with pytest.raises(ValueError, match="budget"):
        tc.calibrate_for_budget(build_tiny("opt"), token_batches(2), budget, "int4", QUIET)


def test_recall_margins_is_the_smallest_common_scale_meeting_the_target():
    from tardis_compiler.calibrate import recall_margins

    g = torch.Generator().manual_seed(5)
    z = torch.randn(2000, 16, generator=g)
    z_hat = z + 0.2 * torch.randn(2000, 16, generator=g)
    lower, upper = torch.full((16,), -0.8), torch.full((16,), 0.9)
    outside = (z < lower) | (z > upper)
    sigma = (z_hat - z).std(0)

    def recall(margin):
        flags = (z_hat < lower + margin) | (z_hat > upper - margin)
        return (flags & outside).sum().item() / outside.sum().item()

    for target in (0.9, 0.99, 0.999):
        margin = recall_margins(z, z_hat, lower, upper, target)
        scale = (margin / sigma).mean().item()
        assert recall(margin) >= target
        assert recall(scale * 0.99 * sigma) < target


def test_non_finite_tokens_are_dropped_with_a_warning():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    batch = torch.randn(256, 16)
    batch[3, 5] = float("nan")
    batch[7, 0] = float("inf")
    with pytest.warns(UserWarning, match="dropped up to 2 token"):
        profile = tc.calibrate(mlp, [batch], tc.CalibrationConfig(progress=False))
    ffn = profile.ffns[""]
    for vector in (ffn.slope, ffn.intercept, ffn.line_error, *ffn.margins.values()):
        assert torch.isfinite(vector).all()
    assert not ffn.lower.isnan().any() and not ffn.upper.isnan().any()
    fast = torch.compile(mlp, backend="tardis", options={"profile": profile, "guard": "all", "inner": "eager"})
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), mlp(x), atol=1e-5, rtol=1e-5)


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
    fast = torch.compile(model, backend="tardis", options={"profile": profile, "guard": "all", "inner": "eager"})
    x = torch.randn(4, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), atol=1e-5, rtol=1e-5)


def test_float64_model_with_guard_all_is_exact_to_float64_precision():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval().double()
    profile = tc.calibrate(mlp, [torch.randn(256, 16, dtype=torch.float64)], tc.CalibrationConfig(progress=False))
    fast = torch.compile(mlp, backend="tardis", options={"profile": profile, "guard": "all", "inner": "eager"})
    x = torch.randn(4, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), mlp(x), atol=1e-11, rtol=1e-11)
