"""Profiles round-trip through safetensors + JSON and refuse models they were not made for."""
import json
import os

import pytest
import torch

import tardis_compiler as tc
from tests.tiny_models import build_tiny, token_batches

QUIET = tc.CalibrationConfig(progress=False, group_size=32)


@pytest.fixture(scope="module")
def profile():
    return tc.calibrate(build_tiny("gpt_neox"), token_batches(3), QUIET)


def test_save_load_round_trip(tmp_path, profile):
    profile.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["profile.json", "tensors.safetensors"]
    meta = json.loads((tmp_path / "profile.json").read_text())
    assert meta["format"] == "tardis-profile" and meta["version"] == 1
    assert meta["ffns"]["gpt_neox.layers.0.mlp"]["d_hidden"] == 128
    loaded = tc.Profile.load(tmp_path)
    assert loaded.config == profile.config and loaded.tokens == profile.tokens
    for name, ffn in profile.ffns.items():
        got = loaded.ffns[name]
        assert got.signature() == ffn.signature() and got.stats == ffn.stats
        torch.testing.assert_close(got.params("int4"), ffn.params("int4"))


def test_profile_path_as_option(tmp_path, profile):
    profile.save(tmp_path)
    assert tc.TardisOptions.from_mapping({"profile": str(tmp_path)}).profile.tokens == profile.tokens


def test_profile_for_another_model_is_refused(profile):
    other = build_tiny("gpt_neox", intermediate_size=64)
    compiled = torch.compile(other, backend="tardis", options={"profile": profile, "inner": "eager"})
    with pytest.raises(Exception, match="does not match the model's FFNs"):
        with torch.no_grad():
            compiled(token_batches(1)[0])


def test_profile_for_another_architecture_is_refused(profile):
    compiled = torch.compile(build_tiny("opt"), backend="tardis", options={"profile": profile, "inner": "eager"})
    with pytest.raises(Exception, match="not in the profile"):
        with torch.no_grad():
            compiled(token_batches(1)[0])


def test_loading_a_non_profile_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Profile.save"):
        tc.Profile.load(tmp_path)
    (tmp_path / "profile.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a tardis profile"):
        tc.Profile.load(tmp_path)
