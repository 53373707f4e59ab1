"""The "svd" guard end to end: SVDP's whitened low-rank predictor of W1 / W_g, stored in the profile,
passed below the per-neuron params, packed, restricted to the guarded neurons."""
import pytest
import torch

import tardis_compiler as tc
from tardis_compiler.runtime.pack import split_params
from tardis_compiler.runtime.pack_cache import PACK_CACHE
from tests.tiny_models import build_tiny, logits, token_batches

CONFIG = tc.CalibrationConfig(progress=False, group_size=32, svd_rank=8)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def calibrated(request):
    model = build_tiny(request.param)
    profile = tc.calibrate_for_budget(model, token_batches(6), 0.5, "svd", CONFIG)
    return model, profile


def _run(model, ids, **options):
    torch.compiler.reset()
    with torch.no_grad():
        # dense_above=None: every token of these 32-token inputs takes the pack (the svd guard's path).
        return logits(torch.compile(model, backend="tardis", options={"inner": "eager", "dense_above": None,
                                                                      **options})(ids))


def test_profile_carries_the_factors_and_the_ops_take_them(calibrated):
    model, profile = calibrated
    for ffn in profile.ffns.values():
        assert ffn.predictor.shape == (8, ffn.d_hidden + ffn.d_in) and set(ffn.margins) == {"svd"}
        assert ffn.stats["guards"]["svd"]["kernel"] == "svd-r8"
        rows, factors = split_params(ffn.params("svd"), ffn.d_hidden)
        torch.testing.assert_close(rows[:4], ffn.params("all")[:4])  # rows 4-5 hold the svd margins
        torch.testing.assert_close(factors, ffn.predictor)
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = logits(model(ids))
    torch.testing.assert_close(_run(model, ids, profile=profile, guard="all"), expected, atol=1e-5, rtol=1e-5)
    got = _run(model, ids, profile=profile, guard="svd")
    assert ((got - expected).norm() / expected.norm()).item() < 0.5
    packs = [e.pack for e in PACK_CACHE._entries.values() if e.pack.layout.guard == "svd"]
    # Q: the guarded rows only (then, with int8 rows, their int8 bundles)
    assert packs and all(p.layout.end_gscales == p.layout.k_guard * 8 * 4 for p in packs)
    assert all(p.guard.numel() == p.layout.off_qbundles + p.layout.k_quant_bundles * p.layout.qstride for p in packs)


def test_save_and_load_keep_the_predictor(calibrated, tmp_path):
    model, profile = calibrated
    profile.save(tmp_path)
    loaded = tc.Profile.load(tmp_path)
    for name, ffn in profile.ffns.items():
        torch.testing.assert_close(loaded.ffns[name].params("svd"), ffn.params("svd"))
    ids = token_batches(1, seed=9)[0]
    torch.testing.assert_close(_run(model, ids, profile=loaded, guard="svd"),
                               _run(model, ids, profile=profile, guard="svd"))


def test_svd_needs_a_profile_calibrated_for_it():
    model = build_tiny("opt")
    profile = tc.calibrate(model, token_batches(2), tc.CalibrationConfig(progress=False))
    with pytest.raises(ValueError, match="svd.*budget|budget"):
        next(iter(profile.ffns.values())).params("svd")


def test_auto_calibration_with_the_svd_guard():
    model = build_tiny("gpt2")
    compiled = torch.compile(model, backend="tardis",
                             options={"guard": "svd", "calibration_calls": 2, "inner": "eager", "dense_above": None,
                                      "calibration": {"progress": False, "svd_rank": 8}})
    with torch.no_grad(), tc.collect_stats() as stats:
        for ids in token_batches(3):
            compiled(ids)
    assert len(stats.ffns) == 2  # the third call ran folded, flagged by the svd guard
