"""What the backend keeps between calls: auto-calibration state per (weights, options), packs per
live weights, nothing left by explain or by a deleted model, one thread's data in its own recorder."""
import gc
import threading
import weakref

import pytest
import torch

import tardis_compiler as tc
from tardis_compiler.backend import STATES, TardisCompiler
from tardis_compiler.calibrate.record import Recorder
from tardis_compiler.calibrate.record import FFNRecord, record_ffn_input, recording
from tardis_compiler.runtime.pack_cache import PACK_CACHE
from tardis_compiler.runtime.stats import active_stats, collect_stats
from tests.tiny_models import build_tiny, logits, token_batches

QUIET = {"progress": False}
#: Counting pack calls on 64-token inputs, which the default dense_above="auto" hands to the dense FFN.
PACK = {"dense_above": None}


def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 32)).eval()


def _tardis_calls(fn, *args) -> int:
    """How many tardis op calls one call of ``fn`` makes (0: it ran dense)."""
    with torch.no_grad(), collect_stats() as stats:
        fn(*args)
    return sum(c.calls for c in stats.ffns.values())


def test_explain_leaves_no_state_for_a_later_compile():
    mlp, x = _mlp(), torch.randn(64, 32)
    tc.explain(mlp, x, inner="eager", calibration_calls=1, calibration={"coverage": 0.5, **QUIET})
    fast = torch.compile(mlp, backend="tardis", options={"inner": "eager", "calibration_calls": 4,
                                                         "calibration": {"coverage": 0.99, **QUIET}, **PACK})
    assert _tardis_calls(fast, x) == 0  # its first call records, dense: explain's profile is not reused


def test_each_guard_gets_its_own_auto_calibration():
    mlp, x = _mlp(), torch.randn(256, 32)
    for guard in ("exact", "int2"):
        reports = []
        fast = torch.compile(mlp, backend=TardisCompiler(tc.TardisOptions(
            guard=guard, inner="eager", calibration_calls=2, calibration=QUIET), reports=reports))
        with torch.no_grad():
            for _ in range(3):
                fast(x)
        row = reports[0].ffns[0]
        assert row.status == "rewritten" and row.guard_kernel == guard
        assert row.recall > 0.99  # int2's own margins, not exact's (which are zero)
        torch.compiler.reset()


def test_clear_caches_forgets_auto_calibration_and_packs():
    mlp, x = _mlp(), torch.randn(64, 32)
    options = {"inner": "eager", "calibration_calls": 1, "calibration": QUIET, **PACK}
    fast = torch.compile(mlp, backend="tardis", options=options)
    with torch.no_grad():
        fast(x)
    assert _tardis_calls(fast, x) == 1 and len(PACK_CACHE)
    tc.clear_caches()
    assert len(PACK_CACHE) == 0
    assert _tardis_calls(fast, x) == 0  # calibrating again


def test_a_deleted_model_leaves_nothing_behind():
    model = build_tiny("gpt2")
    profile = tc.calibrate(model, token_batches(2), tc.CalibrationConfig(**QUIET))
    fast = torch.compile(model, backend="tardis", options={"profile": profile, "inner": "eager"})
    with torch.no_grad():
        fast(token_batches(1)[0])
    weight = weakref.ref(next(model.parameters()))
    assert len(PACK_CACHE)
    del model, fast
    torch.compiler.reset()
    gc.collect()
    assert weight() is None, "the model's weights outlived it"
    assert len(PACK_CACHE) == 0


def test_unfinished_auto_calibration_goes_with_its_model():
    mlp = _mlp()
    fast = torch.compile(mlp, backend="tardis", options={"inner": "eager", "calibration_calls": 50,
                                                         "calibration": QUIET})
    with torch.no_grad():
        fast(torch.randn(64, 32))
    assert len(STATES._states) == 1
    weight = weakref.ref(mlp[0].weight)
    del mlp, fast
    torch.compiler.reset()
    gc.collect()
    assert weight() is None and len(STATES._states) == 0


def test_in_place_edit_of_inference_mode_weights_is_seen():
    with torch.inference_mode():  # a model made under inference_mode: its tensors have no version counter
        mlp = _mlp()
    x = torch.randn(4, 32)
    profile = tc.calibrate(mlp, [torch.randn(128, 32)], tc.CalibrationConfig(**QUIET))
    fast = torch.compile(mlp, backend="tardis", options={"profile": profile, "guard": "all", "inner": "eager"})
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), mlp(x), atol=1e-5, rtol=1e-5)
        mlp[0].bias.add_(1.0)
        torch.testing.assert_close(fast(x), mlp(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guard", ["int8", "int4", "int2"])
@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_inputs_with_a_strided_last_dimension(guard, inner):
    mlp = _mlp()
    # The uniform coverage fit (budget=None) carries margins for every low-bit guard at once.
    profile = tc.calibrate(mlp, [torch.randn(256, 32)], tc.CalibrationConfig(**QUIET, budget=None))
    x = torch.randn(32, 15).t()  # (15, 32), last dimension strided
    assert not x.is_contiguous()
    fast = torch.compile(mlp, backend="tardis", options={"profile": profile, "guard": guard, "inner": inner})
    with torch.no_grad():
        got, dense = fast(x), mlp(x)
    assert torch.isfinite(got).all()
    assert (got - dense).norm() / dense.norm() < 0.2


def test_mixed_grad_modes_during_auto_calibration():
    mlp, x = _mlp(), torch.randn(64, 32)
    fast = torch.compile(mlp, backend="tardis", options={"inner": "eager", "calibration_calls": 2,
                                                         "calibration": QUIET, **PACK})
    with torch.inference_mode():
        fast(x)
    with torch.no_grad():
        fast(x)
        assert _tardis_calls(fast, x) == 1


def test_repeated_calibrate_and_explain_do_not_exhaust_recompiles():
    model = build_tiny("opt")
    batches = token_batches(2)
    for _ in range(10):  # dynamo allows 8 recompiles of one function by default
        profile = tc.calibrate(model, batches, tc.CalibrationConfig(**QUIET))
        assert profile.ffns
    for _ in range(10):
        report = tc.explain(model, batches[0], profile=profile, inner="eager")
        assert report.ffns and all(row.status == "rewritten" for row in report.ffns)


def test_recording_and_counters_are_per_thread():
    w = {"w1_rows": torch.zeros(4, 2), "b1": None, "w2_rows": torch.zeros(4, 2), "b2": None}
    recorders = {}
    barrier = threading.Barrier(2)

    def work(tag: float):
        rec = Recorder(tc.CalibrationConfig(**QUIET))
        rec.ffns["f"] = FFNRecord("f", "p", "relu", w, max_tokens=64, seed=0)
        with recording(rec), collect_stats() as stats:
            barrier.wait()  # both blocks active at once
            for _ in range(5):
                record_ffn_input(torch.full((1, 2), tag), "f")
            assert active_stats() is stats
        recorders[tag] = rec

    threads = [threading.Thread(target=work, args=(t,)) for t in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for tag, rec in recorders.items():
        tokens = rec.ffns["f"].tokens()
        assert tokens.shape[0] == 5 and bool((tokens == tag).all())


def test_two_models_auto_calibrating_in_two_threads():
    models = [build_tiny("opt"), build_tiny("opt")]
    with torch.no_grad():
        for m in models[1:]:
            for p in m.parameters():
                p.mul_(1.5)
    options = {"inner": "eager", "calibration_calls": 3, "guard": "all", "calibration": QUIET, **PACK}
    fast = [torch.compile(m, backend="tardis", options=options) for m in models]
    ids = token_batches(1)[0]
    with torch.no_grad():
        for f in fast:  # compile in this thread, then calibrate concurrently
            f(ids)
    errors = []

    def work(i):
        try:
            with torch.no_grad():
                for _ in range(3):
                    fast[i](ids)
                expected = logits(models[i](ids))
                torch.testing.assert_close(logits(fast[i](ids)), expected, atol=1e-4, rtol=1e-4)
        except Exception as exc:  # reported below, in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
