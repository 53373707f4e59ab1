"""The low-bit guard's encoding: prediction error by bits, packing round trip, bytes, odd shapes."""
import pytest
import torch

from tardis_compiler.runtime.guard import LowBitGuard, dequantize, predict, quantize
from tardis_compiler.runtime.layout import guard_row_bytes


@pytest.mark.parametrize("bits,tol", [(8, 0.02), (4, 0.15), (2, 0.6)])
def test_prediction_error_shrinks_with_bits(bits, tol):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(5, 128, generator=g)
    guard = LowBitGuard.build(w, bits, 64)
    assert guard.kernel == f"int{bits}"
    z = x @ w.T
    rel = (guard.predict(x) - z).norm() / z.norm()
    assert rel < tol


@pytest.mark.parametrize("encoding,levels", [("int4", 15), ("int2", 3)])
@pytest.mark.parametrize("d,group", [(64, 64), (70, 64), (5, 8), (24, 16)])
def test_sub_byte_codes_round_trip(encoding, levels, d, group):
    """Every element is decoded from its own nibble / crumb: dequantize(quantize(w)) is w to within
    half a quantization step of its group (the last group may be shorter)."""
    w = torch.randn(6, d)
    codes, scales = quantize(w, encoding, group)
    back = dequantize(codes, scales, encoding, d, group)
    for start in range(0, d, group):
        chunk = w[:, start:start + group]
        step = (chunk.amax(1) - chunk.amin(1)) / levels
        err = (back[:, start:start + group] - chunk).abs().amax(1)
        assert bool((err <= 0.5 * step * 1.02 + 1e-2 * chunk.abs().amax(1)).all())


def test_bytes_read_counts_codes_and_scales():
    guard = LowBitGuard.build(torch.randn(64, 128), 4, 64)
    assert guard.bytes_read(64, 128) == 64 * (128 // 2 + 2 * 4)
    assert guard.codes.shape == (64, 64) and guard.scales.shape == (64, 8)
    assert guard_row_bytes("int2", 128, 64) == 32 + 8  # really 2 bits per weight


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("m,d", [(32, 8), (24, 64), (40, 16), (3, 1)])
def test_small_and_odd_shapes_are_correct(bits, m, d):
    w = torch.randn(m, d)
    guard = LowBitGuard.build(w, bits, 64)
    x = torch.randn(7, d)
    rel = (guard.predict(x) - x @ w.T).norm() / (x @ w.T).norm()
    assert rel < {8: 0.02, 4: 0.2, 2: 0.7}[bits]


@pytest.mark.parametrize("encoding", ["int8", "int4", "int2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_predicts_as_the_reference_does(encoding, dtype):
    from tardis_compiler.runtime.cpu.kernel import kernel
    from tardis_compiler.runtime.layout import guard_codes_bytes
    from tests.runtime.pack_cases import Case, make

    if kernel() is None:
        pytest.skip("the fused CPU kernel cannot be built here")
    _, _, x, pack = make(Case("gated", 37, 8, 30, guard=encoding, group=16, frac_guarded=1.0, frac_always=0.0,
                              dtype=dtype), 5)
    L = pack.layout
    per_row = guard_codes_bytes(encoding, 37, 16)
    codes = pack.guard[:L.k_guard * per_row].view(L.k_guard, per_row)
    scales = pack.guard[L.off_gscales:].view(L.k_guard, -1)
    expected = predict(codes, scales, encoding, 37, 16, x)
    got = kernel().guard_predict(x, *pack.tensors(), L.k_guard)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
