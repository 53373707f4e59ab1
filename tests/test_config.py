"""Options validate with errors that say what to do."""
import pytest

import tardis_compiler as tc


def test_unknown_option_suggests_the_right_one():
    with pytest.raises(ValueError, match="Did you mean 'guard'"):
        tc.TardisOptions.from_mapping({"gaurd": "int4"})


@pytest.mark.parametrize("bad", [{"guard": "int3"}, {"inner": "tvm"}, {"calibration_calls": 0},
                                 {"calibration": {"coverage": 1.5}}])
def test_bad_values_rejected(bad):
    with pytest.raises(ValueError):
        tc.TardisOptions.from_mapping(bad)


def test_calibration_config_round_trip():
    cfg = tc.CalibrationConfig(coverage=0.7, max_tokens=100)
    assert tc.CalibrationConfig.from_dict(cfg.to_dict()) == cfg


def test_skip_accepts_regex():
    opts = tc.TardisOptions(skip=r"model\.layers\.[01]")
    assert opts.skips("model.layers.1") and not opts.skips("model.layers.10")
