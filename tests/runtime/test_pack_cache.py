"""The pack cache: reuse, invalidation by in-place updates, no confusion at freed addresses, no leak."""
import gc
import weakref

import torch

from tardis_compiler.runtime.pack import build_pack, guard_all_params
from tardis_compiler.runtime.pack_cache import PackCache


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w1_rows": torch.randn(16, 8, generator=g), "b1": torch.randn(16, generator=g),
            "w2_rows": torch.randn(16, 8, generator=g), "b2": None}


def _get(cache, w, params):
    return cache.get([w["w1_rows"], w["b1"], w["w2_rows"], w["b2"]], params, ("all", 64),
                     lambda: build_pack("plain", w, params, "all", "relu", 64))


def test_reused_and_rebuilt_after_an_in_place_update():
    cache, w, params = PackCache(), _weights(), guard_all_params(16)
    first = _get(cache, w, params)
    assert _get(cache, w, params) is first and cache.builds == 1
    with torch.no_grad():
        w["b1"].add_(1.0)
    second = _get(cache, w, params)
    assert second is not first and cache.builds == 2
    assert not torch.equal(second.floats, first.floats)


def test_another_calibration_of_the_same_weights_gets_its_own_pack():
    cache, w = PackCache(), _weights()
    a, b = guard_all_params(16), guard_all_params(16)
    assert _get(cache, w, a) is not _get(cache, w, b)
    assert _get(cache, w, a) is _get(cache, w, a) and cache.builds == 2


def test_a_deleted_model_takes_its_pack_along_and_a_new_one_is_never_confused_with_it():
    cache, params = PackCache(), guard_all_params(16)
    w = _weights(0)
    pack = _get(cache, w, params)
    ref = weakref.ref(w["w1_rows"])
    pack_ref = weakref.ref(pack)
    del w, pack
    gc.collect()
    assert ref() is None and len(cache) == 0 and pack_ref() is None  # nothing of the old model is kept
    for seed in range(10):  # new weights, often at the freed addresses: always their own pack
        w = _weights(seed + 1)
        got = _get(cache, w, params)
        expected = build_pack("plain", w, params, "all", "relu", 64)
        assert torch.equal(got.weights, expected.weights) and torch.equal(got.floats, expected.floats)
        del w, got
        gc.collect()


def test_the_cache_holds_no_reference_to_the_weights():
    cache, params = PackCache(), guard_all_params(16)
    w = _weights()
    _get(cache, w, params)
    refs = [weakref.ref(t) for t in w.values() if t is not None]
    del w
    gc.collect()
    assert all(r() is None for r in refs)
