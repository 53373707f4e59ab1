"""Profiles round-trip through safetensors + JSON and refuse models they were not made for."""
import dataclasses
import json
import os

import pytest
import torch

import tardis_compiler as tc
from tests.tiny_models import build_tiny, token_batches

QUIET = tc.CalibrationConfig(progress=False, group_size=32, budget=None)  # the uniform coverage fit, every low-bit guard


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
    with pytest.raises(tc.ProfileError, match="Profile.save"):
        tc.Profile.load(tmp_path)
    (tmp_path / "profile.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a tardis profile"):
        tc.Profile.load(tmp_path)


def _corrupt(tmp_path, profile, meta_edit=None, tensor_edit=None):
    from safetensors.torch import load_file, save_file

    profile.save(tmp_path)
    meta_path, tensor_path = tmp_path / "profile.json", tmp_path / "tensors.safetensors"
    if meta_edit is not None:
        meta = json.loads(meta_path.read_text())
        meta = meta_edit(meta)
        meta_path.write_text(json.dumps(meta))
    if tensor_edit is not None:
        tensors = load_file(tensor_path)
        tensor_edit(tensors)
        save_file(tensors, tensor_path)
    return tmp_path


NAME = "gpt_neox.layers.0.mlp"


def _set(path, value):
    def edit(meta):
        target = meta
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return meta
    return edit


_DELETE = object()


@pytest.mark.parametrize("edit,field", [
    (_set(["version"], -5), "version"),
    (_set(["version"], "1"), "version"),
    (_set(["version"], 99), "version"),
    (_set(["version"], _DELETE), "version"),
    (_set(["ffns", NAME, "d_hidden"], 0), "d_hidden"),
    (_set(["ffns", NAME, "kind"], "weird"), "kind"),
    (_set(["ffns", NAME, "guards"], ["int3"]), "guards"),
    (_set(["config", "coverage"], 7), "config"),
    (lambda meta: [meta], "JSON object"),
])
def test_corrupt_metadata_is_one_clear_error(tmp_path, profile, edit, field):
    path = _corrupt(tmp_path, profile, meta_edit=edit)
    with pytest.raises(tc.ProfileError, match=field) as info:
        tc.Profile.load(path)
    assert "profile.json" in str(info.value)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.__setitem__(f"{NAME}/slope", torch.zeros(1)), "shape"),
    (lambda t: t.__setitem__(f"{NAME}/lower", torch.full_like(t[f"{NAME}/lower"], float("nan"))), "NaN"),
    (lambda t: t.__setitem__(f"{NAME}/slope", torch.full_like(t[f"{NAME}/slope"], float("inf"))), "infinite"),
    (lambda t: t.pop(f"{NAME}/intercept"), "missing"),
])
def test_corrupt_tensors_are_one_clear_error(tmp_path, profile, edit, match):
    path = _corrupt(tmp_path, profile, tensor_edit=edit)
    with pytest.raises(tc.ProfileError, match=match) as info:
        tc.Profile.load(path)
    assert "tensors.safetensors" in str(info.value) and NAME in str(info.value)


def test_unreadable_files_are_one_clear_error(tmp_path, profile):
    profile.save(tmp_path)
    (tmp_path / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(tc.ProfileError, match="safetensors"):
        tc.Profile.load(tmp_path)
    (tmp_path / "profile.json").write_text("{not json")
    with pytest.raises(tc.ProfileError, match="JSON"):
        tc.Profile.load(tmp_path)


def test_a_budget_profile_with_unbounded_ranges_round_trips(tmp_path):
    """A per-neuron mix has +-inf ranges and infinite line errors: valid, and it must load."""
    model = build_tiny("bert")
    fitted = tc.calibrate_for_budget(model, token_batches(3), 0.5, "int8", dataclasses.replace(QUIET, bundles="dense"))
    ffn = next(iter(fitted.ffns.values()))
    assert torch.isinf(ffn.lower).any() and torch.isinf(ffn.line_error).any()
    fitted.save(tmp_path)
    loaded = tc.Profile.load(tmp_path)
    for name, ffn in fitted.ffns.items():
        torch.testing.assert_close(loaded.ffns[name].params("int8"), ffn.params("int8"))
