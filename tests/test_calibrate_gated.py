import math

import pytest
import torch
import torch.nn.functional as F

import tardis_compiler as tc
from tardis_compiler.calibrate import FFNRecord
from tardis_compiler.runtime import ffn_op
from tardis_compiler.runtime.pack import build_pack
from tardis_compiler.calibrate_gated import _best_window, prefix_sums, fit_gated_ffn, gated_dense_bytes


def _record(seed: int = 0, d: int = 32, m: int = 128, tokens: int = 3000, bias: bool = False) -> FFNRecord:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = {"wg_rows": r(m, d) / 3 - 0.05, "bg": r(m) - 1.0 if bias else None, "wu_rows": r(m, d) / 4,
         "bu": r(m) if bias else None, "wd_rows": r(m, d) / 8, "bd": r(d) if bias else None}
    rec = FFNRecord("mlp", "gated", "silu", w, max_tokens=tokens, seed=seed)
    rec.add(r(tokens, d))
    return rec


def _cfg(budget):
    return tc.CalibrationConfig(budget=budget, progress=False)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_budget_is_met_on_held_out_tokens(budget):
    ffn = fit_gated_ffn(_record(), _cfg(budget), "int8")
    assert ffn.kind == "gated" and ffn.stats["policy"]["within_budget"]
    assert ffn.stats["bytes_fraction"] <= budget * 1.05  # chosen on fit tokens, measured on held-out ones
    assert ffn.bytes_per_token("int8") / ffn.bytes_per_token("dense") == pytest.approx(ffn.stats["bytes_fraction"])


def test_error_falls_as_the_budget_grows():
    errors = [fit_gated_ffn(_record(), _cfg(b), "int8").stats["guards"]["int8"]["rel_error"] for b in (0.3, 0.5, 0.8)]
    assert errors[0] > errors[1] > errors[2]


def test_held_out_error_matches_the_op(tmp_path):
    """The error calibration reports is the error the fused op makes with the fitted params."""
    rec = _record(bias=True)
    ffn = fit_gated_ffn(rec, _cfg(0.5), "exact")
    w = rec.weights
    x = torch.randn(500, 32, generator=torch.Generator().manual_seed(9))
    out = ffn_op.ffn(x, build_pack("gated", w, ffn.params("exact"), "exact", "silu", 64))
    dense = F.linear(F.silu(F.linear(x, w["wg_rows"], w["bg"])) * F.linear(x, w["wu_rows"], w["bu"]),
                     w["wd_rows"].t(), w["bd"])
    rel = ((out - dense).norm() / dense.norm()).item()
    assert rel == pytest.approx(ffn.stats["guards"]["exact"]["rel_error"], rel=0.3)
    assert 0 < rel < 0.5


def test_best_window_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    z, a, u = torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g), torch.randn(40, 3, generator=g)
    order = z.argsort(0)
    zs, as_, u2 = z.gather(0, order), a.double().gather(0, order), u.double().pow(2).gather(0, order)
    prefix = {"uu": prefix_sums(u2), "auu": prefix_sums(as_ * u2), "aauu": prefix_sums(as_ * as_ * u2)}
    lower, upper, c = _best_window(zs, prefix, 0.5, with_fold=True)
    k = 20
    for j in range(3):
        best = min(range(40 - k + 1), key=lambda s: _sse(as_[s:s + k, j], u2[s:s + k, j]))
        assert lower[j] == zs[best, j] and upper[j] == zs[best + k - 1, j]
        window = slice(best, best + k)
        assert c[j].item() == pytest.approx((as_[window, j] * u2[window, j]).sum().item() / u2[window, j].sum().item(),
                                            rel=1e-5)


def _sse(a, u2):
    c = (a * u2).sum() / u2.sum()
    return ((a - c) ** 2 * u2).sum().item()


def test_exact_and_folded_neurons_are_encoded_in_the_ranges():
    ffn = fit_gated_ffn(_record(), _cfg(0.6), "int8")
    params = ffn.params("int8")
    always = params[2] > params[3]
    unguarded = torch.isinf(params[4]) & torch.isinf(params[5]) & ~always
    counts = ffn.stats["policy"]["counts"]
    assert int(always.sum()) == counts.get("exact", 0)
    assert int(unguarded.sum()) == counts.get("folded", 0) + counts.get("dropped", 0)
    assert (params[1][always] == 0).all()  # exact neurons are not in the folded matrix


def test_profile_round_trip_keeps_the_kind(tmp_path):
    ffn = fit_gated_ffn(_record(), _cfg(0.5), "int8")
    profile = tc.Profile(ffns={"mlp": ffn}, config=_cfg(0.5), tokens=3000, source="test")
    profile.save(tmp_path)
    got = tc.Profile.load(tmp_path).ffns["mlp"]
    assert got.kind == "gated" and got.signature() == ffn.signature()
    torch.testing.assert_close(got.params("int8"), ffn.params("int8"))
    with pytest.raises(ValueError, match="calibrated for guard"):
        got.params("int4")


def test_dense_bytes():
    assert gated_dense_bytes(4, 8, 4, 2, True, True) == (2 * 8 * 4 + 8 * 4 + 16 + 4) * 2
    assert math.isfinite(gated_dense_bytes(576, 1536, 576, 4, False, False))


def test_model_allocation_meets_the_budget_overall_and_moves_bytes_to_the_larger_error():
    from tardis_compiler.calibrate_budget import fit_policy_ffns

    easy, hard = _record(seed=1), _record(seed=2)
    easy.name, hard.name = "easy", "hard"
    with torch.no_grad():  # "hard": the same FFN with gates spread far wider, so folding costs more
        hard.weights["wg_rows"].mul_(3.0)
    cfg = tc.CalibrationConfig(budget=0.5, progress=False, allocation="model")
    ffns = fit_policy_ffns([easy, hard], cfg, {"gated": "int8"})
    spent = {n: f.stats["policy"]["calibration_bytes_fraction"] for n, f in ffns.items()}
    assert (spent["easy"] + spent["hard"]) / 2 <= 0.5 + 1e-6
    assert spent["hard"] > spent["easy"]


def test_budgets_fitted_from_one_recording_share_the_prepared_options():
    from tardis_compiler.calibrate import calibrate_for_budget, record
    from tests.tiny_models import build_tiny, token_batches

    model, batches = build_tiny("llama"), token_batches(4)
    recorder = record(model, batches, tc.CalibrationConfig(progress=False))
    profiles = [calibrate_for_budget(model, batches, b, recorder=recorder) for b in (0.3, 0.6)]
    assert len(recorder.prepared) == 2  # per FFN, for one guard and config: computed once for both budgets
    fractions = [p.bytes_fraction() for p in profiles]
    assert fractions[0] <= 0.3 * 1.05 and 0.3 * 1.05 < fractions[1] <= 0.6 * 1.05
