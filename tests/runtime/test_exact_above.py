"""Calls above ``dense_above`` on a pack alone (no dense weights): every bundled neuron exact
(``torch_path.ffn_exact`` for bundles in the model's dtype, the kernel's exact_all mode for int8
ones, ``ffn_exact`` over them dequantized where the kernel cannot run); ``every_token_through_packs``
keeps every call on the guarded paths."""
from __future__ import annotations

import json

import pytest
import torch

from tardis_compiler.activations import get_activation_rule
from tardis_compiler.runtime import ffn_op
from tardis_compiler.runtime.cpu.kernel import kernel
from tardis_compiler.runtime.module import TardisFFN, layout_of_spec
from tardis_compiler.runtime.pack import dense_reference
from tardis_compiler.runtime.quantize import reference_weights
from tardis_compiler.runtime.stats import collect_stats
from tardis_compiler.runtime.torch_path import ffn_exact
from tests.runtime.pack_cases import Case, make

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _every_neuron_bundled(kind: str, dtype: torch.dtype, bundles: str = "dense") -> Case:
    """Guarded and always-exact neurons only (no neuron is folded without a bundle), and lines (a Wf
    to cancel): every neuron exact is the dense FFN, and the guarded result differs from it."""
    return Case(kind, 24, 12, 40, guard="int4", dtype=dtype, frac_guarded=0.8, frac_always=0.2, lines=True,
                bundles=bundles)


@pytest.mark.parametrize("kind", ["plain", "gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_call_above_dense_above_runs_every_bundled_neuron_exactly(kind, dtype):
    case = _every_neuron_bundled(kind, dtype)
    w, _, _, pack = make(case, 6)
    x = case.inputs(6)
    dense = dense_reference(kind, w, get_activation_rule(case.activation).fn, x)
    with collect_stats() as stats:
        above = ffn_op.ffn(x, pack, "layer", dense_above=5)
        at = ffn_op.ffn(x[:5], pack, "layer", dense_above=5)
    torch.testing.assert_close(above, dense, **TOL[dtype])
    torch.testing.assert_close(at, ffn_op.ffn(x[:5], pack))  # 5 tokens: the guarded paths
    assert (ffn_op.ffn(x, pack).float() - dense.float()).abs().max() > 10 * TOL[dtype]["atol"]  # they approximate
    counters = stats.ffns["layer"]
    assert (counters.calls, counters.tokens, counters.dense_calls, counters.dense_tokens) == (1, 5, 1, 6)


@pytest.mark.parametrize("kind", ["plain", "gated"])
def test_ffn_exact_of_a_quantized_pack_is_the_int8_models_ffn(kind):
    """Through the dequantized bundles (the op sends int8 bundles elsewhere; the function still
    computes the documented result). No lines: an int8 Wf's own rounding would not cancel."""
    case = Case(kind, 24, 12, 40, guard="int4", frac_guarded=0.8, frac_always=0.2, lines=False,
                weights_encoding="int8")
    w, _, x, pack = make(case, 4)
    ref = reference_weights(kind, w, "int8")
    expected = dense_reference(kind, ref, get_activation_rule(case.activation).fn, x)
    torch.testing.assert_close(ffn_exact(x, pack.weights, pack.guard, pack.floats, pack.layout), expected,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(kernel() is None, reason="the fused CPU kernel cannot be built here")
def test_int8_bundles_run_the_kernels_exact_all_mode_above_dense_above():
    case = _every_neuron_bundled("gated", torch.float32, bundles="int8")
    _, _, x, pack = make(case, 6)
    assert pack.layout.k_quant_bundles
    with collect_stats() as stats:
        got = ffn_op.ffn(x, pack, "layer", dense_above=0)
    torch.testing.assert_close(got, ffn_exact(x, pack.weights, pack.guard, pack.floats, pack.layout),
                               atol=1e-5, rtol=1e-5)
    assert stats.ffns["layer"].dense_calls == 1


def test_int8_bundles_run_every_bundle_exact_where_the_kernel_cannot(monkeypatch):
    """Above the kernel's token limit, or without the kernel, a call above dense_above still skips
    the guard: ``ffn_exact`` over the dequantized bundles (the guarded torch path dequantizes them
    too, then also runs the guard), not the guarded result."""
    case = _every_neuron_bundled("gated", torch.float32, bundles="int8")
    _, _, _, pack = make(case, 6)
    x = case.inputs(ffn_op.FUSED_MAX_TOKENS + 3)
    exact = ffn_exact(x, pack.weights, pack.guard, pack.floats, pack.layout)
    torch.testing.assert_close(ffn_op.ffn(x, pack, dense_above=0), exact, atol=0, rtol=0)
    assert not torch.allclose(ffn_op.ffn(x, pack), exact)  # the guarded result differs: some neurons are folded
    monkeypatch.setattr(ffn_op, "kernel", lambda: None)
    exact6 = ffn_exact(x[:6], pack.weights, pack.guard, pack.floats, pack.layout)
    torch.testing.assert_close(ffn_op.ffn(x[:6], pack, dense_above=0), exact6, atol=0, rtol=0)


def test_every_token_through_packs_ignores_dense_above_in_this_thread_only():
    case = _every_neuron_bundled("gated", torch.float32)
    _, _, x, pack = make(case, 6)
    guarded = ffn_op.ffn(x, pack)
    with ffn_op.every_token_through_packs():
        torch.testing.assert_close(ffn_op.ffn(x, pack, dense_above=0), guarded, atol=0, rtol=0)
        with ffn_op.every_token_through_packs():
            pass
        assert not ffn_op.runs_dense(6, 0)  # still inside the outer block
        import threading
        seen = []
        worker = threading.Thread(target=lambda: seen.append(ffn_op.runs_dense(6, 0)))
        worker.start()
        worker.join()
        assert seen == [True]  # another thread is not inside this block
    assert ffn_op.runs_dense(6, 0)


def test_a_modules_threshold_round_trips_through_its_spec_and_old_specs_keep_minus_one():
    case = _every_neuron_bundled("gated", torch.float32)
    _, _, x, pack = make(case, 6)
    module = TardisFFN.from_pack("mlp", pack, dense_above="auto")
    spec = json.loads(json.dumps(module.spec()))
    assert spec["dense_above"] == "auto" and "dense" not in spec
    reloaded = TardisFFN.empty(spec)
    assert reloaded.dense_above == "auto" and reloaded.dense_threshold() == ffn_op.dense_above_for(torch.float32,
                                                                                                    kept_dense=False)
    torch.set_num_threads(1)  # "auto" follows the threads (tests/conftest.py restores them)
    assert reloaded.dense_threshold() == ffn_op.EXACT_ABOVE[torch.float32][1] != ffn_op.DENSE_ABOVE[torch.float32][1]
    del spec["dense_above"]  # written before modules without dense weights recorded it: as it ran then
    assert TardisFFN.empty(spec).dense_threshold() == -1
    with torch.no_grad():
        torch.testing.assert_close(TardisFFN.from_pack("mlp", pack, dense_above=0)(x),
                                   ffn_op.ffn(x, pack, dense_above=0), atol=0, rtol=0)


@pytest.mark.parametrize("value, message", [(-2, "integer >= -1"), ("always", "integer >= -1"), (True, "integer >= -1"),
                                            (1.5, "integer >= -1")])
def test_a_bad_threshold_in_a_spec_is_refused(value, message):
    case = _every_neuron_bundled("plain", torch.float32)
    _, _, _, pack = make(case, 2)
    spec = TardisFFN.from_pack("mlp", pack).spec()
    spec["dense_above"] = value
    with pytest.raises(ValueError, match=message):
        layout_of_spec(spec)


def test_a_spec_with_both_thresholds_is_refused():
    case = _every_neuron_bundled("plain", torch.float32)
    _, _, _, pack = make(case, 2)
    spec = TardisFFN.from_pack("mlp", pack).spec()
    spec["dense"] = {"biases": [True, True], "dense_above": 4, "sha256": "0" * 64}
    with pytest.raises(ValueError, match="both 'dense' and 'dense_above'"):
        layout_of_spec(spec)
