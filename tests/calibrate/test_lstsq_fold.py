import dataclasses

import pytest
import torch
import torch.nn.functional as F

import tardis_compiler as tc
from tests.calibrate.records import gated_record, skewed_inputs
from tardis_compiler.calibrate import FFNRecord, split_tokens
from tardis_compiler.calibrate.allocate import fit_gated_ffn, fit_plain_ffn
from tardis_compiler.calibrate.lstsq_fold import fit_fold_term, fold_term_output
from tardis_compiler.profile import ProfileError
from tardis_compiler.runtime import ffn_op
from tardis_compiler.runtime.pack import build_pack, dense_reference


def _gated_record(seed: int = 0) -> FFNRecord:
    return gated_record(seed, bias=True, inputs=skewed_inputs)


def _plain_record(seed: int = 0, d: int = 32, m: int = 128, tokens: int = 3000) -> FFNRecord:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = {"w1_rows": r(m, d) / 4, "b1": r(m) / 2, "w2_rows": r(m, d) / 8, "b2": r(d)}
    rec = FFNRecord("mlp", "linear-act-linear", "gelu", w, max_tokens=tokens, seed=seed)
    rec.add(skewed_inputs(r, tokens, d))
    return rec


def _cfg(budget: float, **kw) -> tc.CalibrationConfig:
    return tc.CalibrationConfig(budget=budget, progress=False, **kw)


def test_fit_fold_term_recovers_a_linear_residual_and_refuses_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 8, generator=g) + 2.0
    coef = torch.randn(8, 3, generator=g)
    residual = x @ coef + torch.tensor([1.0, -2.0, 0.5])
    term = fit_fold_term(x, residual)
    torch.testing.assert_close(fold_term_output(term, x), residual, atol=2e-2, rtol=1e-3)
    noise = torch.randn(4000, 3, generator=g)
    term = fit_fold_term(x, noise)  # None, or a tiny map that beat nothing by chance on the held-out share
    assert term is None or fold_term_output(term, x).norm() < 0.1 * noise.norm()


@pytest.mark.parametrize("kind", ["gated", "plain"])
def test_the_term_is_never_worse_on_the_tokens_it_is_fitted_to(kind):
    """Ridge least squares: its objective at the solution is at most that of M = 0."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 16, generator=g)
    residual = torch.tanh(x[:, :4] @ torch.randn(4, 6, generator=g)) + 0.3 * torch.randn(3000, 6, generator=g)
    term = fit_fold_term(x, residual)
    assert term is not None
    after = (residual - fold_term_output(term, x)).square().sum()
    assert after < residual.square().sum()


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
