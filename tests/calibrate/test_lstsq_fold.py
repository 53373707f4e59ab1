import dataclasses

import pytest
import torch
import torch.nn.functional as F

import tardis_compiler as tc
from tardis_compiler.calibrate import FFNRecord, split_tokens
from tardis_compiler.calibrate.allocate import fit_gated_ffn, fit_plain_ffn
from tardis_compiler.calibrate.lstsq_fold import NeuronRegressions
from tardis_compiler.profile import ProfileError
from tardis_compiler.runtime import ffn_op
from tardis_compiler.runtime.pack import build_pack, dense_reference


def _inputs(r, tokens: int, d: int) -> torch.Tensor:
    """Skewed inputs driven by a few latent factors, as real FFN inputs are: with Gaussian ones a
    neuron's nonlinearity carries no information about the other directions of x, and the
    regression can only tie the per-neuron line."""
    latent = (0.8 * r(tokens, 8)).exp() - 1
    return latent @ r(8, d) / 2 + 0.1 * r(tokens, d)


def _gated_record(seed: int = 0, d: int = 32, m: int = 128, tokens: int = 3000, bias: bool = True) -> FFNRecord:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = {"wg_rows": r(m, d) / 3 - 0.05, "bg": r(m) - 1.0 if bias else None, "wu_rows": r(m, d) / 4,
         "bu": r(m) if bias else None, "wd_rows": r(m, d) / 8, "bd": r(d) if bias else None}
    rec = FFNRecord("mlp", "gated", "silu", w, max_tokens=tokens, seed=seed)
    rec.add(_inputs(r, tokens, d))
    return rec


def _plain_record(seed: int = 0, d: int = 32, m: int = 128, tokens: int = 3000) -> FFNRecord:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = {"w1_rows": r(m, d) / 4, "b1": r(m) / 2, "w2_rows": r(m, d) / 8, "b2": r(d)}
    rec = FFNRecord("mlp", "linear-act-linear", "gelu", w, max_tokens=tokens, seed=seed)
    rec.add(_inputs(r, tokens, d))
    return rec


def _cfg(budget: float, **kw) -> tc.CalibrationConfig:
    return tc.CalibrationConfig(budget=budget, progress=False, **kw)


def test_regressions_recover_a_linear_neuron_and_its_term():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 8, generator=g) + 2.0
    coef = torch.randn(8, 3, generator=g)
    h = x @ coef + torch.tensor([1.0, -2.0, 0.5])
    reg = NeuronRegressions.fit(x, h, torch.ones(3))
    assert reg.error.max().item() < 1e-6
    out_rows = torch.randn(3, 5, generator=g)
    term = reg.term(torch.tensor([0, 2]), out_rows)
    expected = h[:, [0, 2]] @ out_rows[[0, 2]]
    torch.testing.assert_close(F.linear(x, term[:, :-1], term[:, -1]), expected, atol=1e-3, rtol=1e-4)


def test_regression_is_no_worse_than_the_per_neuron_constant_on_calibration_tokens():
    """The regression on x contains c * u (u linear in x) in its span."""
    rec = _gated_record()
    w, x = rec.weights, rec.tokens()
    g, u = F.linear(x, w["wg_rows"], w["bg"]), F.linear(x, w["wu_rows"], w["bu"])
    h = F.silu(g) * u
    c = (h * u).sum(0) / (u * u).sum(0)  # the least-squares constant of act(g) u ~ c u
    constant_error = (h - c * u).square().mean(0)
    reg = NeuronRegressions.fit(x, h, torch.ones(h.shape[1]))
    fitted = (x.double() - reg.mean_x) @ reg.coef.double() + reg.mean_h
    in_sample = (h.double() - fitted).square().mean(0)
    assert (in_sample <= constant_error * (1 + 1e-3)).all()  # the ridge may cost a hair
    assert in_sample.sum() < 0.9 * constant_error.sum()
    assert (reg.error >= in_sample).all()  # the GCV inflation


@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_lstsq_fold_cuts_the_held_out_error_at_the_same_bytes(kind):
    rec = _gated_record() if kind == "gated" else _plain_record()
    fit = fit_gated_ffn if kind == "gated" else fit_plain_ffn
    lines = fit(rec, _cfg(0.3, fold_fit="lines", fold=True), "int8")
    lstsq = fit(rec, _cfg(0.3, fold_fit="lstsq", fold=True), "int8")
    assert lines.fold_term is None and lstsq.fold_term is not None
    assert lstsq.fold_term.shape == (32, 33)
    err = lambda f: f.stats["guards"]["int8"]["rel_error"]  # noqa: E731
    assert err(lstsq) < err(lines)
    assert lstsq.stats["bytes_fraction"] <= 0.3 * 1.05


@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_op_error_with_the_fitted_term_is_what_calibration_measured(kind):
    rec = _gated_record() if kind == "gated" else _plain_record()
    fit = fit_gated_ffn if kind == "gated" else fit_plain_ffn
    config = _cfg(0.5, fold=True)
    ffn = fit(rec, config, "exact")
    act = F.silu if kind == "gated" else F.gelu
    _, x, _ = split_tokens(rec.tokens(), config)  # the held-out tokens calibration measured on
    pack = build_pack(kind, rec.weights, ffn.params("exact"), "exact", ffn.activation, 64, ffn.fold_term)
    out, dense = ffn_op.ffn(x, pack), dense_reference(kind, rec.weights, act, x)
    rel = ((out - dense).norm() / dense.norm()).item()
    assert rel == pytest.approx(ffn.stats["guards"]["exact"]["rel_error"], rel=0.02)  # tokens at a band edge may flip


@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_guard_all_leaves_the_fitted_term_out_and_is_exact(kind):
    rec = _gated_record() if kind == "gated" else _plain_record()
    fit = fit_gated_ffn if kind == "gated" else fit_plain_ffn
    ffn = fit(rec, _cfg(0.3, fold=True), "int8")
    assert ffn.fold_term is not None
    act = F.silu if kind == "gated" else F.gelu
    x = torch.randn(7, 32, generator=torch.Generator().manual_seed(1))
    pack = build_pack(kind, rec.weights, ffn.params("int8"), "all", ffn.activation, 64, ffn.fold_term)
    torch.testing.assert_close(ffn_op.ffn(x, pack), dense_reference(kind, rec.weights, act, x), atol=1e-5, rtol=1e-5)


def test_profile_round_trip_keeps_the_term_and_checks_its_shape(tmp_path):
    ffn = fit_gated_ffn(_gated_record(), _cfg(0.5, fold=True), "int8")
    profile = tc.Profile(ffns={"mlp": ffn}, config=_cfg(0.5), tokens=3000, source="test")
    profile.save(tmp_path / "p")
    loaded = tc.Profile.load(tmp_path / "p")
    torch.testing.assert_close(loaded.ffns["mlp"].fold_term, ffn.fold_term)
    bad = dataclasses.replace(ffn, fold_term=ffn.fold_term[:, :-1])
    tc.Profile(ffns={"mlp": bad}, config=_cfg(0.5), tokens=3000, source="test").save(tmp_path / "bad")
    with pytest.raises(ProfileError, match="fold_term.*expected"):
        tc.Profile.load(tmp_path / "bad")
