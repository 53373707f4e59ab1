"""gated.py: the per-neuron options of gated FFNs, fitted to a budget and measured."""
import pytest
import torch
import torch.nn.functional as F

import tardis_compiler as tc
from tardis_compiler.calibrate.allocate import fit_gated_ffn
from tardis_compiler.calibrate.gated import _best_window
from tardis_compiler.calibrate.ranges import prefix_sums
from tardis_compiler.runtime import ffn_op
from tardis_compiler.runtime.pack import build_pack
from tests.calibrate.records import gated_record


def _cfg(budget):
    return tc.CalibrationConfig(budget=budget, progress=False)


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_budget_is_met_on_held_out_tokens(budget):
    ffn = fit_gated_ffn(gated_record(), _cfg(budget), "int8")
    assert ffn.kind == "gated" and ffn.stats["policy"]["within_budget"]
    assert ffn.stats["bytes_fraction"] <= budget * 1.05  # chosen on fit tokens, measured on held-out ones
    assert ffn.bytes_per_token("int8") / ffn.bytes_per_token("dense") == pytest.approx(ffn.stats["bytes_fraction"])


def test_error_falls_as_the_budget_grows():
    errors = [fit_gated_ffn(gated_record(), _cfg(b), "int8").stats["guards"]["int8"]["rel_error"]
              for b in (0.3, 0.5, 0.8)]
    assert errors[0] > errors[1] > errors[2]


def test_held_out_error_matches_the_op(tmp_path):
    """The error calibration reports is the error the fused op makes with the fitted params."""
    rec = gated_record(bias=True)
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
    ffn = fit_gated_ffn(gated_record(), _cfg(0.6), "int8")
    params = ffn.params("int8")
    always = params[2] > params[3]
    unguarded = torch.isinf(params[4]) & torch.isinf(params[5]) & ~always
    counts = ffn.stats["policy"]["counts"]
    assert int(always.sum()) == counts.get("exact", 0)
    assert int(unguarded.sum()) == counts.get("folded", 0) + counts.get("dropped", 0)
    assert (params[1][always] == 0).all()  # exact neurons are not in the folded matrix


def test_profile_round_trip_keeps_the_kind(tmp_path):
    ffn = fit_gated_ffn(gated_record(), _cfg(0.5), "int8")
    profile = tc.Profile(ffns={"mlp": ffn}, config=_cfg(0.5), tokens=3000, source="test")
    profile.save(tmp_path)
    got = tc.Profile.load(tmp_path).ffns["mlp"]
    assert got.kind == "gated" and got.signature() == ffn.signature()
    torch.testing.assert_close(got.params("int8"), ffn.params("int8"))
    with pytest.raises(ValueError, match="calibrated for guard"):
        got.params("int4")
