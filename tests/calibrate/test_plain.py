"""The per-neuron policy for plain FFNs: window lines, budgets met, exact with guard="all"."""
import pytest
import torch

import tardis_compiler as tc
from tardis_compiler.calibrate.allocate import fit_plain_ffn
from tardis_compiler.calibrate.plain import _window_lines
from tardis_compiler.calibrate.ranges import prefix_sums
from tardis_compiler.calibrate.record import FFNRecord
from tests.tiny_models import ARCHITECTURES, build_tiny, logits, token_batches


def test_window_lines_are_least_squares_fits():
    torch.manual_seed(0)
    z = torch.randn(200, 3).sort(dim=0).values.double()
    y = torch.nn.functional.gelu(z)
    prefix = {"z": prefix_sums(z), "zz": prefix_sums(z * z), "y": prefix_sums(y), "zy": prefix_sums(z * y),
              "yy": prefix_sums(y * y)}
    k = 50
    window = {key: v[k:] - v[: 200 - k + 1] for key, v in prefix.items()}
    slope, intercept, sse = _window_lines(window, k, with_fold=True)
    start, col = 37, 1
    zs, ys = z[start:start + k, col], y[start:start + k, col]
    design = torch.stack([zs, torch.ones_like(zs)], 1)
    coef = torch.linalg.lstsq(design, ys[:, None]).solution.squeeze(1)
    torch.testing.assert_close(torch.stack([slope[start, col], intercept[start, col]]), coef)
    torch.testing.assert_close(sse[start, col], (design @ coef - ys).pow(2).sum(), rtol=1e-6, atol=1e-9)
    _, _, sse0 = _window_lines(window, k, with_fold=False)
    torch.testing.assert_close(sse0[start, col], ys.pow(2).sum())


def _record(m=256, d=32, act="gelu", tokens=3000):
    torch.manual_seed(0)
    w = {"w1_rows": torch.randn(m, d) / d ** 0.5, "b1": torch.randn(m) * 0.1,
         "w2_rows": torch.randn(m, d) / m ** 0.5, "b2": torch.randn(d) * 0.1}
    rec = FFNRecord("mlp", "linear-act-linear", act, w, max_tokens=tokens, seed=0)
    rec.add(torch.randn(tokens, d))
    return rec


@pytest.mark.parametrize("act", ["gelu", "relu"])
def test_budget_is_met_and_error_falls_as_it_grows(act):
    rec = _record(act=act)
    # Dense bundles: with int8 ones this small FFN can guard every neuron by 0.5, and the error floors.
    ffns = [fit_plain_ffn(rec, tc.CalibrationConfig(budget=b, progress=False, bundles="dense"), "int8")
            for b in (0.3, 0.5, 0.8)]
    for budget, ffn in zip((0.3, 0.5, 0.8), ffns):
        assert ffn.stats["policy"]["within_budget"]
        assert ffn.stats["bytes_fraction"] <= budget + 0.03
        assert sum(ffn.stats["policy"]["counts"].values()) == 256
    errors = [f.stats["guards"]["int8"]["rel_error"] for f in ffns]
    assert errors[0] > errors[1] > errors[2], errors


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_guard_all_equals_eager_and_budget_is_read(arch):
    model = build_tiny(arch)
    ids = token_batches(1, seed=9)[0]
    profile = tc.calibrate_for_budget(model, token_batches(6), 0.5, config=tc.CalibrationConfig(progress=False,
                                                                                                group_size=32))
    assert all(f.has_policy and f.kind == "plain" for f in profile.ffns.values())
    with torch.no_grad():
        expected = logits(model(ids))
        torch.compiler.reset()
        got = logits(torch.compile(model, backend="tardis", options={"profile": profile, "guard": "all",
                                                                            "dense_above": None})(ids))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    report = tc.explain(model, ids, profile=profile, inner="eager", dense_above=None)
    assert all(r.status == "rewritten" and sum(r.policy.values()) == r.d_hidden for r in report.ffns)
    assert sum(r.bytes_tardis for r in report.ffns) / sum(r.bytes_dense for r in report.ffns) <= 0.5 + 0.03
    assert "Neuron mix per FFN" in str(report)


def test_error_shrinks_with_the_budget_end_to_end():
    model = build_tiny("gpt2")
    recorder = tc.record(model, token_batches(6), tc.CalibrationConfig(progress=False, group_size=32))
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = logits(model(ids))
    errors = []
    for budget in (0.3, 0.8):
        torch.compiler.reset()
        profile = tc.calibrate_for_budget(model, None, budget, recorder=recorder)
        with torch.no_grad():
            got = logits(torch.compile(model, backend="tardis", options={"profile": profile, "inner": "eager",
                                                                            "dense_above": None})(ids))
        errors.append(((got - expected).norm() / expected.norm()).item())
    assert errors[1] < errors[0] < 0.5, errors


def test_budget_none_gives_plain_ffns_the_coverage_fit():
    profile = tc.calibrate(build_tiny("opt"), token_batches(4), tc.CalibrationConfig(progress=False, budget=None))
    assert all(not f.has_policy and set(f.margins) == {"int2", "int4", "int8"} for f in profile.ffns.values())
    assert all(f.stats["error_bound"] > 0 for f in profile.ffns.values())


def test_the_default_is_the_per_neuron_mix_at_the_default_budget():
    profile = tc.calibrate(build_tiny("opt"), token_batches(4), tc.CalibrationConfig(progress=False))
    assert tc.CalibrationConfig().budget == tc.DEFAULT_BUDGET == 0.5
    assert all(f.has_policy and f.kind == "plain" for f in profile.ffns.values())
    # int8 bundles (the default) make guarded neurons cheap: the budget holds, and need not bind here.
    assert profile.bytes_fraction("int8") <= tc.DEFAULT_BUDGET + 0.02
    assert all(f.stats["bundles"] == "int8" for f in profile.ffns.values())


def test_quantized_calibration_fits_and_prices_against_the_int8_reference():
    """weights="int8": the mix is fitted on the int8 weights' values, the budget is a fraction of the
    int8 FFN's bytes (codes and scales), and it is met."""
    from tardis_compiler.accounting import ffn_bytes_per_token

    rec = _record()
    ffn = fit_plain_ffn(rec, tc.CalibrationConfig(budget=0.5, progress=False, weights="int8"), "int8")
    assert ffn.weights == "int8" and ffn.stats["weights"] == "int8"
    assert ffn.stats["dense_bytes"] == ffn_bytes_per_token(32, 256, 32, 4, True, weights="int8")
    assert ffn.stats["policy"]["within_budget"] and ffn.stats["bytes_fraction"] <= 0.5 + 0.03
    dense = fit_plain_ffn(rec, tc.CalibrationConfig(budget=0.5, progress=False), "int8")
    assert dense.weights == "dense" and dense.stats["dense_bytes"] > 3 * ffn.stats["dense_bytes"]
