"""The fused op: opcheck-clean, exact with every neuron flagged, correct dense shortcut, memoised folds."""
import pytest
import torch

from tardis_compiler.profile import FFNProfile
from tardis_compiler.runtime import ops  # noqa: F401
from tardis_compiler.runtime.fold import FOLD_CACHE

OP = torch.ops.tardis.folded_ffn


def _ffn(m=48, d=32, d_out=24, layout="out_in", bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(m, d, generator=g) / d ** 0.5
    w2 = torch.randn(d_out, m, generator=g) / m ** 0.5
    if layout == "in_out":
        w1, w2 = w1.t().contiguous(), w2.t().contiguous()
    b1 = torch.randn(m, generator=g) * 0.1 if bias else None
    b2 = torch.randn(d_out, generator=g) * 0.1 if bias else None
    params = torch.zeros(6, m)
    params[0] = torch.rand(m, generator=g)          # slope
    params[1] = torch.randn(m, generator=g) * 0.1   # intercept
    params[2], params[3] = -0.5, 0.5                # range
    params[4], params[5] = -0.4, 0.4                # guard thresholds (margin 0.1)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(w1), cast(b1), cast(w2), cast(b2), params


def _dense(x, w1, b1, w2, b2, layout, act=torch.nn.functional.gelu):
    w1r = w1 if layout == "out_in" else w1.t()
    w2r = w2 if layout == "out_in" else w2.t()
    return torch.nn.functional.linear(act(torch.nn.functional.linear(x, w1r, b1)), w2r, b2)


def _call(x, w1, b1, w2, b2, params, layout, guard, dense_above=1.0, name="t"):
    return OP(x, w1, b1, w2, b2, params, name, "gelu", layout, layout, guard, 32, dense_above)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 32), (3, 5, 32)])
def test_guard_all_is_exact(layout, bias, shape):
    w1, b1, w2, b2, params = _ffn(layout=layout, bias=bias)
    x = torch.randn(shape)
    torch.testing.assert_close(_call(x, w1, b1, w2, b2, params, layout, "all"),
                               _dense(x, w1, b1, w2, b2, layout), atol=1e-5, rtol=1e-5)


def test_exact_guard_error_is_the_line_error_of_in_range_neurons():
    w1, b1, w2, b2, params = _ffn()
    x = torch.randn(4, 32)
    y = _call(x, w1, b1, w2, b2, params, "out_in", "exact")
    z = x @ w1.T + b1
    # Per token: exact activation where that token's z is out of range, the line elsewhere.
    flagged = (z < params[2]) | (z > params[3])
    h = torch.where(flagged, torch.nn.functional.gelu(z), params[0] * z + params[1])
    torch.testing.assert_close(y, h @ w2.T + b2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guard", ["exact", "int4"])
def test_dense_shortcut_computes_the_same_function(guard):
    from tardis_compiler.runtime.stats import collect_stats
    w1, b1, w2, b2, params = _ffn()
    x = torch.randn(64, 32) * 2  # many tokens: the union of flagged neurons is nearly everything
    with collect_stats() as stats:
        shortcut = _call(x, w1, b1, w2, b2, params, "out_in", guard, dense_above=0.5, name="s")
    folded = _call(x, w1, b1, w2, b2, params, "out_in", guard, dense_above=1.0, name="f")
    assert stats.ffns["s"].dense_calls == 1
    torch.testing.assert_close(shortcut, folded, atol=1e-5, rtol=1e-5)


def test_output_of_a_token_does_not_depend_on_its_batch():
    w1, b1, w2, b2, params = _ffn()
    x = torch.randn(16, 32)
    batched = _call(x, w1, b1, w2, b2, params, "out_in", "int4")
    alone = torch.cat([_call(x[i:i + 1], w1, b1, w2, b2, params, "out_in", "int4") for i in range(16)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guard", ["all", "exact", "int4", "int8", "int2"])
def test_opcheck(guard):
    w1, b1, w2, b2, params = _ffn()
    args = (torch.randn(2, 3, 32), w1, b1, w2, b2, params, f"opcheck_{guard}", "gelu", "out_in", "out_in", guard, 32, 0.5)
    torch.library.opcheck(OP.default, args)


def test_bf16_runs_close():
    w1, b1, w2, b2, params = _ffn(dtype=torch.bfloat16)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    y = _call(x, w1, b1, w2, b2, params, "out_in", "all")
    assert y.dtype == torch.bfloat16
    ref = _dense(x.float(), w1.float(), b1.float(), w2.float(), b2.float(), "out_in")
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_fold_is_memoised_and_invalidated_by_in_place_update():
    w1, b1, w2, b2, params = _ffn(seed=3)
    x = torch.randn(2, 32)
    _call(x, w1, b1, w2, b2, params, "out_in", "all", name="memo")
    builds = FOLD_CACHE.builds
    _call(x, w1, b1, w2, b2, params, "out_in", "all", name="memo")
    assert FOLD_CACHE.builds == builds  # reused
    w2.mul_(2.0)                            # bumps _version
    y = _call(x, w1, b1, w2, b2, params, "out_in", "all", name="memo")
    assert FOLD_CACHE.builds == builds + 1
    torch.testing.assert_close(y, _dense(x, w1, b1, w2, b2, "out_in"), atol=1e-5, rtol=1e-5)


def test_profile_params_rows_match_op_contract():
    m = 4
    prof = FFNProfile("f", "p", "gelu", 2, m, 2, torch.ones(m), torch.zeros(m), -torch.ones(m), torch.ones(m),
                      torch.zeros(m), {"int4": torch.full((m,), 0.25)}, {})
    p = prof.params("int4")
    assert p.shape == (6, m)
    assert torch.equal(p[4], torch.full((m,), -0.75)) and torch.equal(p[5], torch.full((m,), 0.75))
    assert torch.equal(prof.params("exact")[4], -torch.ones(m))


def test_fold_cache_does_not_confuse_a_new_model_at_a_freed_address():
    # Same storage pointer and version, different weights: only contents tell them apart.
    w1, b1, w2, b2, params = _ffn(seed=5)
    x = torch.randn(2, 32)
    _call(x, w1, b1, w2, b2, params, "out_in", "all", name="reuse")
    clone = w2.clone()
    w2_new = torch.empty_like(w2)
    w2_new.set_(w2.untyped_storage(), 0, w2.shape, w2.stride())  # another object over w2's memory
    with torch.no_grad():
        w2_new.copy_(clone * 3)
    y = _call(x, w1, b1, w2_new, b2, params, "out_in", "all", name="reuse")
    torch.testing.assert_close(y, _dense(x, w1, b1, w2_new, b2, "out_in"), atol=1e-5, rtol=1e-5)


def test_two_profiles_of_one_model_keep_their_own_folds():
    w1, b1, w2, b2, params = _ffn(seed=7)
    other = params.clone()
    other[0] *= 0.5
    x = torch.randn(1, 32)
    _call(x, w1, b1, w2, b2, params, "out_in", "all", name="pair")
    _call(x, w1, b1, w2, b2, other, "out_in", "all", name="pair")
    builds = FOLD_CACHE.builds
    for _ in range(3):  # alternating must not re-fold
        _call(x, w1, b1, w2, b2, params, "out_in", "all", name="pair")
        _call(x, w1, b1, w2, b2, other, "out_in", "all", name="pair")
    assert FOLD_CACHE.builds == builds


def _policy_params(m=48, seed=0, lines=True):
    """A per-neuron mix: 8 always exact, 16 folded unguarded, the rest guarded."""
    *_, params = _ffn(m=m, seed=seed)
    inf = float("inf")
    if not lines:
        params[0:2] = 0.0
    params[0:2, :8] = 0.0
    params[2:6:2, :8], params[3:6:2, :8] = inf, -inf          # empty range and band: always flagged
    params[2:6:2, 8:24], params[3:6:2, 8:24] = -inf, inf      # unbounded: never flagged
    return params


@pytest.mark.parametrize("lines", [True, False])
@pytest.mark.parametrize("guard", ["int8", "int4"])
def test_policy_mix_matches_its_reference(guard, lines):
    """Always-exact neurons are corrected for every token, unguarded ones never, the guarded ones
    where the guard's low-bit copy (of their rows only) leaves the band; lines = 0: no fold."""
    from tardis_compiler.runtime.guard import LowBitGuard

    FOLD_CACHE.clear()
    w1, b1, w2, b2, _ = _ffn()
    params = _policy_params(lines=lines)
    x = torch.randn(5, 32)
    for dense_above in (1.0, 0.0):  # the gather path and the dense prefill path
        y = _call(x, w1, b1, w2, b2, params, "out_in", guard, dense_above=dense_above, name=f"mix{guard}{lines}")
        z = x @ w1.T + b1
        watched = torch.arange(24, 48)
        low_bit = LowBitGuard.build(w1[watched], {"int8": 8, "int4": 4}[guard], 32)
        z_hat = low_bit.predict(x) + b1[watched]
        flags = torch.zeros(5, 48, dtype=torch.bool)
        flags[:, :8] = True
        flags[:, watched] = (z_hat < params[4, watched]) | (z_hat > params[5, watched])
        h = torch.where(flags, torch.nn.functional.gelu(z), params[0] * z + params[1])
        torch.testing.assert_close(y, h @ w2.T + b2, atol=1e-5, rtol=1e-5)
    folded = next(e.value for slot, e in FOLD_CACHE._entries.items() if slot[0].startswith(f"mix{guard}{lines}|"))
    assert folded.always.tolist() == list(range(8)) and folded.guarded.tolist() == list(range(24, 48))
    assert (folded.weight is None) == (not lines)


@pytest.mark.parametrize("guard", ["all", "int8"])
def test_opcheck_policy_mix(guard):
    w1, b1, w2, b2, _ = _ffn()
    torch.library.opcheck(OP.default, (torch.randn(3, 32), w1, b1, w2, b2, _policy_params(), "opcheck-mix", "gelu",
                                       "out_in", "out_in", guard, 32, 0.5))


def test_svd_guard_flags_from_the_factors_below_the_params():
    from tardis_compiler.runtime.svd_predictor import SVDPredictor

    FOLD_CACHE.clear()
    w1, b1, w2, b2, _ = _ffn()
    rows = _policy_params()
    predictor = SVDPredictor.build(w1, torch.randn(200, 32), rank=6)
    params = torch.cat([torch.cat([rows, torch.zeros(6, 32)], 1), torch.cat([predictor.Q.t(), predictor.P], 1)])
    x = torch.randn(5, 32)
    y = _call(x, w1, b1, w2, b2, params, "out_in", "svd", name="svd-mix")
    z, z_hat = x @ w1.T + b1, predictor.predict(x) + b1
    flags = (z_hat < rows[4]) | (z_hat > rows[5])
    flags[:, :8] = True
    h = torch.where(flags, torch.nn.functional.gelu(z), rows[0] * z + rows[1])
    torch.testing.assert_close(y, h @ w2.T + b2, atol=1e-5, rtol=1e-5)
    torch.library.opcheck(OP.default, (x, w1, b1, w2, b2, params, "svd-opcheck", "gelu", "out_in", "out_in", "svd",
                                       32, 0.5))
