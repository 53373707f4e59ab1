import pytest
import torch
import torch.nn.functional as F

from tardis_compiler.runtime import gated_ops  # noqa: F401  (registers the op)
from tardis_compiler.runtime.fold import clear_caches
from tardis_compiler.runtime.guard import LowBitGuard

OP = torch.ops.tardis.gated_ffn
INF = float("inf")


def _ffn(bias: bool, seed: int = 0, m: int = 64, d: int = 32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = {"wg": r(m, d) / 4, "wu": r(m, d) / 4, "wd": r(d, m) / 8}
    w.update({"bg": r(m), "bu": r(m), "bd": r(d)} if bias else {"bg": None, "bu": None, "bd": None})
    return {k: (v.to(dtype) if v is not None else None) for k, v in w.items()}


def _params(m: int, seed: int = 0, margin: float = 0.0) -> torch.Tensor:
    """Neurons 0-4 always exact, 5-9 folded unguarded, the rest guarded on a random range."""
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(6, m)
    p[1] = torch.rand(m, generator=g) * 0.3
    lo = torch.randn(m, generator=g) - 1.0
    hi = lo + 1.5
    lo[:5], hi[:5] = INF, -INF
    lo[5:10], hi[5:10] = -INF, INF
    p[2], p[3] = lo, hi
    p[4], p[5] = lo + margin, hi - margin
    return p


def _dense(x, w):
    g = F.linear(x, w["wg"], w["bg"])
    return F.linear(F.silu(g) * F.linear(x, w["wu"], w["bu"]), w["wd"], w["bd"])


def _reference(x, w, p, flags):
    g = F.linear(x, w["wg"], w["bg"])
    hidden = torch.where(flags, F.silu(g), p[1]) * F.linear(x, w["wu"], w["bu"])
    return F.linear(hidden, w["wd"], w["bd"])


def _call(x, w, p, guard, dense_above=1.0, name="t", offsets=(0, 0), fused=None):
    wg, bg, wu, bu = (fused if fused else (w["wg"], w["bg"], w["wu"], w["bu"]))
    return OP(x, wg, bg, wu, bu, w["wd"], w["bd"], p, name, "silu", *offsets, guard, 64, dense_above)


@pytest.mark.parametrize("bias", [False, True])
def test_guard_all_reproduces_dense(bias):
    w, x = _ffn(bias), torch.randn(2, 5, 32)
    torch.testing.assert_close(_call(x, w, _params(64), "all"), _dense(x, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dense_above", [1.0, 0.01])
def test_exact_guard_uses_the_constant_outside_flags(dense_above):
    w, x, p = _ffn(True), torch.randn(7, 32), _params(64)
    g = F.linear(x, w["wg"], w["bg"])
    flags = (g < p[2]) | (g > p[3])
    assert flags[:, :5].all() and not flags[:, 5:10].any()
    torch.testing.assert_close(_call(x, w, p, "exact", dense_above), _reference(x, w, p, flags), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_gate_up_weights_with_offsets(bias):
    w, x, p = _ffn(bias), torch.randn(4, 32), _params(64)
    wgu = torch.cat([w["wg"], w["wu"]])
    bgu = torch.cat([w["bg"], w["bu"]]) if bias else None
    fused = _call(x, w, p, "exact", name="fused", offsets=(0, 64), fused=(wgu, bgu, wgu, bgu))
    torch.testing.assert_close(fused, _call(x, w, p, "exact"), atol=1e-5, rtol=1e-5)
    swapped = torch.cat([w["wu"], w["wg"]])
    bsw = torch.cat([w["bu"], w["bg"]]) if bias else None
    out = _call(x, w, p, "exact", name="swapped", offsets=(64, 0), fused=(swapped, bsw, swapped, bsw))
    torch.testing.assert_close(out, fused, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guard,bits", [("int8", 8), ("int4", 4)])
def test_low_bit_guard_flags_from_its_own_prediction(guard, bits):
    w, x, p = _ffn(True), torch.randn(6, 32), _params(64, margin=-0.2)
    clear_caches()
    guarded = torch.arange(10, 64)
    g_hat = LowBitGuard.build(w["wg"][guarded], bits, 64).predict(x) + w["bg"][guarded]
    flags = torch.zeros(6, 64, dtype=torch.bool)
    flags[:, :5] = True
    flags[:, guarded] = (g_hat < p[4, guarded]) | (g_hat > p[5, guarded])
    expected = _reference(x, w, p, flags)
    torch.testing.assert_close(_call(x, w, p, guard), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_call(x, w, p, guard, dense_above=0.01), expected, atol=1e-5, rtol=1e-5)


def test_outputs_do_not_depend_on_the_batch():
    w, x, p = _ffn(True), torch.randn(9, 32), _params(64)
    batch = _call(x, w, p, "int8")
    single = torch.cat([_call(x[i:i + 1], w, p, "int8") for i in range(9)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


def test_all_constants_zero_needs_no_folded_matrix():
    w, x, p = _ffn(True), torch.randn(3, 32), _params(64)
    p[1] = 0
    g = F.linear(x, w["wg"], w["bg"])
    torch.testing.assert_close(_call(x, w, p, "exact", name="zero"), _reference(x, w, p, (g < p[2]) | (g > p[3])),
                               atol=1e-5, rtol=1e-5)


def test_bf16_guard_all_close_to_dense():
    w, x = _ffn(True, dtype=torch.bfloat16), torch.randn(3, 32, dtype=torch.bfloat16)
    out = _call(x, w, _params(64), "all").float()
    ref = _dense(x.float(), {k: (v.float() if v is not None else None) for k, v in w.items()})
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("guard", ["all", "exact", "int8", "int4"])
def test_opcheck(guard):
    w, x = _ffn(True), torch.randn(3, 32)
    torch.library.opcheck(OP.default, (x, w["wg"], w["bg"], w["wu"], w["bu"], w["wd"], w["bd"], _params(64),
                                       f"op-{guard}", "silu", 0, 0, guard, 64, 0.5))
