"""The low-bit guard predicts z within its quantization error, through the packed CPU kernels."""
import pytest
import torch

from tardis_compiler.runtime.guard import LowBitGuard


@pytest.mark.parametrize("bits,kernel,tol", [(8, "int8pack", 0.02), (4, "int4pack", 0.15), (2, "int4pack", 0.6)])
def test_prediction_error_shrinks_with_bits(bits, kernel, tol):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    x = torch.randn(5, 128, generator=g)
    guard = LowBitGuard.build(w, bits, 64)
    assert guard.kernel == kernel
    z = x @ w.T
    rel = (guard.predict(x) - z).norm() / z.norm()
    assert rel < tol


def test_shape_without_packed_kernel_falls_back_to_dequantized():
    w = torch.randn(16, 24)  # 24 has no supported int4 group size
    guard = LowBitGuard.build(w, 4, 64)
    assert guard.kernel == "dequantized" and guard.bits_read == 16
    x = torch.randn(3, 24)
    assert (guard.predict(x) - x @ w.T).norm() / (x @ w.T).norm() < 0.15


def test_bytes_read_counts_codes_and_scales():
    guard = LowBitGuard.build(torch.randn(64, 128), 4, 64)
    assert guard.bytes_read(64, 128) == 64 * 128 // 2 + 64 * 2 * 2 * 2


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("m,d", [(32, 8), (24, 64), (40, 16)])
def test_small_and_odd_shapes_are_correct(bits, m, d):
    # torch's packed int8 kernel crashes at in_features 8 and the int4 pack needs out_features % 16:
    # such shapes must take the dequantized path, never the crash.
    w = torch.randn(m, d)
    guard = LowBitGuard.build(w, bits, 64)
    x = torch.randn(7, d)
    rel = (guard.predict(x) - x @ w.T).norm() / (x @ w.T).norm()
    assert rel < {8: 0.02, 4: 0.2, 2: 0.7}[bits]
