import importlib

import pytest
import torch

import tardis_compiler as tc
from tardis_compiler.calibrate.record import Recorder
from tardis_compiler.config import DEFAULT_GUARDS
from tardis_compiler.calibrate.sequential import exact_stand_in, split_groups
from tardis_compiler.profile import Profile
from tests.tiny_models import build_tiny, token_batches

record_module = importlib.import_module("tardis_compiler.calibrate.record")  # shadowed by calibrate.record()


def _cfg(**kw) -> tc.CalibrationConfig:
    return tc.CalibrationConfig(progress=False, group_size=32, **kw)


def _record(model, batches, recorder: Recorder) -> Recorder:
    record_module.run_recording(model, batches, recorder, "test")
    return recorder


def test_split_groups_keeps_order_and_sizes():
    assert split_groups(list("abcdefg"), 3) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]
    assert split_groups(list("ab"), 5) == [["a"], ["b"]]
    assert split_groups(list("abc"), 1) == [["a", "b", "c"]]


def test_a_prefix_of_exact_stand_ins_records_the_dense_inputs():
    model = build_tiny("llama")
    batches = token_batches(3)
    dense = tc.record(model, batches, _cfg())
    first, second = list(dense.ffns)
    prefix = Profile({n: exact_stand_in(r) for n, r in dense.ffns.items()}, _cfg(), 0, "stand-ins")
    again = _record(model, batches, dense.spawn({second}, prefix, dict(DEFAULT_GUARDS), stop_after=second))
    assert list(again.ffns) == [second]
    torch.testing.assert_close(again.ffns[second].tokens(), dense.ffns[second].tokens(), atol=1e-5, rtol=1e-5)


def test_a_compressed_prefix_changes_what_later_ffns_see_and_stops_early():
    model = build_tiny("llama")
    batches = token_batches(3)
    dense = tc.record(model, batches, _cfg())
    first, second = list(dense.ffns)
    fitted = tc.calibrate_for_budget(model, batches, 0.3, config=_cfg(), recorder=dense)
    prefix = Profile({first: fitted.ffns[first], second: exact_stand_in(dense.ffns[second])}, _cfg(), 0, "prefix")
    seen = _record(model, batches, dense.spawn({second}, prefix, dict(DEFAULT_GUARDS), stop_after=second))
    shift = (seen.ffns[second].tokens() - dense.ffns[second].tokens()).norm() / dense.ffns[second].tokens().norm()
    assert shift > 1e-3
    assert seen.ffns[second].seen == dense.ffns[second].seen  # every batch reached the FFN, then stopped


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sequential_profiles_meet_the_budget_and_run(arch):
    model = build_tiny(arch)
    batches = token_batches(4)
    profile = tc.calibrate_for_budget(model, batches, 0.5, config=_cfg(sequential=2))
    assert profile.source.endswith("2 sequential groups") and len(profile.ffns) == 2
    assert all(f.stats["policy"]["within_budget"] for f in profile.ffns.values())
    compiled = torch.compile(model, backend="tardis", options={"profile": profile, "inner": "eager",
                                                                 "dense_above": None, "guard": "all"})
    ids = token_batches(1, seed=7)[0]
    with torch.no_grad():
        out, expected = compiled(ids), model(ids)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)


def test_sequential_needs_the_batches_with_a_recorder():
    model = build_tiny("llama")
    recorder = tc.record(model, token_batches(2), _cfg())
    with pytest.raises(ValueError, match="pass them along with the recorder"):
        tc.calibrate_for_budget(model, None, 0.5, config=_cfg(sequential=2), recorder=recorder)


def test_sequential_is_validated():
    with pytest.raises(ValueError, match="sequential"):
        tc.CalibrationConfig(sequential=0)
