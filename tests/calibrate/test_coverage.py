"""coverage.py: what the uniform-coverage fit measures on held-out tokens."""
import tardis_compiler as tc
from tests.tiny_models import build_tiny, token_batches

QUIET = tc.CalibrationConfig(progress=False, group_size=32, budget=None)  # the uniform coverage fit


def test_profile_measures_coverage_flag_rate_and_recall():
    profile = tc.calibrate(build_tiny("opt"), token_batches(6), QUIET)
    assert len(profile.ffns) == 2
    ffn = profile.ffns["model.decoder.layers.0"]
    assert 0.75 < ffn.stats["coverage"] < 0.95
    int4 = ffn.stats["guards"]["int4"]
    assert int4["recall"] > 0.98 and int4["flag_rate"] >= 1 - ffn.stats["coverage"] - 0.02
    assert ffn.stats["guards"]["exact"]["recall"] == 1.0
    assert ffn.stats["error_bound"] > 0
