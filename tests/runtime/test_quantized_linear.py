"""QuantizedLinear: int8 / int4 weight-only linears (runtime/quantized_linear.py): each computes the
matmul of its own dequantized weight (tight), stays close to the float linear (SQNR bounds), and its
tensors round-trip through state dicts, devices and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from tardis_compiler.runtime.quantized_linear import (QuantizedLinear, pack_nibbles, quantize_int4, quantize_int8,
                                                      unpack_nibbles)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(64, 96), (576, 192), (128, 48), (96, 200)]  # (in, out); out 200 is not a multiple of 16 (int4 fallback)


def _linear(k: int, n: int, dtype: torch.dtype, bias: bool = True, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, k ** -0.5)
        lin.weight[0, 0] = 4 * k ** -0.5  # an outlier, as real weights have
    return lin.to(dtype).eval()


def _sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,n", SHAPES)
def test_output_is_the_matmul_of_its_dequantized_weight(bits, dtype, k, n):
    lin = _linear(k, n, dtype)
    q = QuantizedLinear.from_linear(lin, bits)
    assert q.cpu_layout == (bits == 4 and n % 16 == 0)
    x = torch.randn(2, 5, k).to(dtype)
    want = F.linear(x.float(), q.dequantize(torch.float32), lin.bias.float())
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]  # the output's rounding
    torch.testing.assert_close(q(x).float(), want, atol=tol * want.abs().max().item(), rtol=tol)
    assert q(x).dtype == dtype and q(x).shape == (2, 5, n)


@pytest.mark.parametrize("bits,floor", [(8, 38.0), (4, 18.0)])
def test_sqnr_against_the_float_linear(bits, floor):
    lin = _linear(576, 192, torch.float32)
    q = QuantizedLinear.from_linear(lin, bits)
    x = torch.randn(64, 576)
    with torch.no_grad():
        assert _sqnr(lin.weight, q.dequantize()) > floor
        assert _sqnr(lin(x), q(x)) > floor
    # int8 per channel: about 48 dB on Gaussian rows; int4 in groups of 32: about 24 dB


def test_codes_and_scales_are_the_documented_ones():
    w = torch.randn(32, 64)
    q8, s8 = quantize_int8(w)
    assert q8.dtype == torch.int8 and int(q8.abs().max()) == 127
    torch.testing.assert_close(s8, w.abs().amax(1) / 127)
    assert torch.equal(q8, (w / s8[:, None]).round().clamp(-127, 127).to(torch.int8))
    q4, sz = quantize_int4(w, 32)
    codes = unpack_nibbles(q4)
    assert q4.shape == (32, 32) and sz.shape == (2, 32, 2) and int(codes.max()) <= 15
    assert torch.equal(pack_nibbles(codes), q4)
    scale, zero = sz[..., 0].t(), sz[..., 1].t()  # per (row, group)
    groups = w.reshape(32, 2, 32)
    torch.testing.assert_close(scale, (groups.amax(-1) - groups.amin(-1)) / 15)
    torch.testing.assert_close(zero, groups.amin(-1) + 8 * scale)


def test_zero_rows_get_a_positive_scale_and_zero_codes():
    lin = _linear(64, 32, torch.bfloat16)
    with torch.no_grad():
        lin.weight[3] = 0
    for bits in (8, 4):
        q = QuantizedLinear.from_linear(lin, bits)
        scales = q.scale if bits == 8 else q.scales_and_zeros[..., 0]
        assert bool((scales > 0).all())
        assert torch.equal(q.dequantize()[3], torch.zeros(64, dtype=torch.bfloat16))


@pytest.mark.parametrize("bits", [8, 4])
def test_state_dict_round_trip_holds_the_portable_codes(bits):
    lin = _linear(128, 64, torch.bfloat16)
    q = QuantizedLinear.from_linear(lin, bits)
    state = q.state_dict()
    if bits == 4:  # the CPU layout is never what is saved
        assert q.cpu_layout and torch.equal(state["qweight"], quantize_int4(lin.weight)[0])
    fresh = QuantizedLinear(128, 64, bits, True, torch.bfloat16)
    fresh.load_state_dict(state)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), q(x)) and fresh.digest() == q.digest()


@pytest.mark.parametrize("bits", [8, 4])
def test_other_dtypes_and_devices_take_the_dequantizing_path(bits):
    lin = _linear(64, 32, torch.float32)
    q = QuantizedLinear.from_linear(lin, bits)
    x = torch.randn(4, 64)
    fast = q(x)
    slow = F.linear(x, q.dequantize(), q.bias)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
    x64 = x.double()  # not a dtype torch's ops take: the fallback, same function
    torch.testing.assert_close(q(x64), F.linear(x64, q.dequantize(torch.float64), q.bias.double()))
    q.to(torch.float64)  # dtypes stay (the checkpoint's config records them); devices would move
    assert q.dtype == torch.float32 and q.qweight.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert torch.equal(q(x), fast)


def test_int4_cpu_layout_reads_back_exactly_for_several_shapes():
    for n in (16, 48, 64, 96, 192, 272):  # tails of torch's 32 / 64-row blocks
        w = torch.randn(n, 128)
        portable, sz = quantize_int4(w)
        q = QuantizedLinear(128, n, 4, False)
        q.qweight, q.scales_and_zeros = portable, sz
        q.prepare()
        assert q.cpu_layout and not torch.equal(q.qweight, portable)
        assert torch.equal(q.portable_qweight(), portable)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of the group 32"):
        QuantizedLinear.from_linear(torch.nn.Linear(48, 16), 4)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QuantizedLinear(64, 16, 3)


@pytest.mark.parametrize("bits", [8, 4])
def test_runs_under_torch_compile(bits):
    q = QuantizedLinear.from_linear(_linear(64, 32, torch.bfloat16), bits)
    x = torch.randn(1, 3, 64, dtype=torch.bfloat16)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), q(x))
