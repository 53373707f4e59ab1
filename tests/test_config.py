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


@pytest.mark.parametrize("bad", [{"budget": "0.5"}, {"budget": True}, {"skip": 5}, {"profile": 123},
                                 {"calibration_calls": True}, {"calibration_calls": 2.0},
                                 {"calibration": {"max_tokens": 16.5}}, {"calibration": {"group_size": 8.0}},
                                 {"calibration": {"svd_rank": 2.5}}, {"calibration": {"budget": True}},
                                 {"calibration": {"coverage": "0.5"}}, {"skip": ["("]}, {"guard": 4}])
def test_wrong_types_are_value_errors_that_name_the_option(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key if key != "calibration" else next(iter(bad[key]))):
        tc.TardisOptions.from_mapping(bad)


@pytest.mark.parametrize("bad,says", [({"weights": "int3"}, "weights must be None, 'int8' or 'int4'"),
                                      ({"weights": "int4", "bundles": "dense"}, "bundles must be 'int8'"),
                                      ({"weights": "int8", "bundles": "dense"}, "bundles must be 'int8'")])
def test_quantized_pack_options_are_checked(bad, says):
    with pytest.raises(ValueError, match=says):
        tc.CalibrationConfig(**bad)
    assert tc.CalibrationConfig(weights="int8").weights == "int8"
    assert tc.CalibrationConfig(weights="int4").weights == "int4"
