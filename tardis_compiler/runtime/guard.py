"""The online guard: a low-bit copy of W1 that predicts z = W1 x cheaply.

Group-wise round-to-nearest, asymmetric (per-group min and scale). On CPU the prediction runs on
torch's packed low-bit GEMV kernels (what torchao's weight-only quantization uses):
``_weight_int4pack_mm_for_cpu`` for int2/int4 (int2 codes live in int4 containers, so they read
4 bits per weight; the explain report says so) and ``_weight_int8pack_mm`` for int8 (per-row
scales). Both are fast only with bf16 activations (measured: 0.9 ms vs 29 ms in fp32 for an
8192x2048 int4 GEMV on this CPU), so x is cast to bf16 for the prediction; calibration measures
the error of exactly this path, so the margins cover the bf16 rounding too. Where no packed kernel
applies (CUDA, or a shape the kernel rejects) the dequantized bf16 weight is used.
"""
from __future__ import annotations

import dataclasses

import torch

_INT4_KERNEL_GROUPS = (32, 64, 128, 256)
# Measured on torch 2.13 CPU: _weight_int8pack_mm gives wrong results at in_features 8 and crashes
# (segfault) with 5+ rows there; in_features >= 16 was correct for every shape tried. The int4
# pack refuses out_features not divisible by 16. Shapes outside these use the dequantized path.
_INT8_KERNEL_MIN_IN = 16
_INT4_KERNEL_OUT_MULTIPLE = 16


@dataclasses.dataclass
class LowBitGuard:
    """A quantized neuron-major W1 (m, d) that predicts ``x @ W1.T`` (bias not included).

    Example:
        >>> w = torch.randn(64, 128)
        >>> guard = LowBitGuard.build(w, bits=4, group_size=64)
        >>> x = torch.randn(3, 128)
        >>> err = (guard.predict(x) - x @ w.T).abs().max()
        >>> bool(err < 0.2 * (x @ w.T).abs().max())
        True
    """

    bits: int
    group_size: int
    kernel: str  # "int4pack", "int8pack" or "dequantized"
    weight: torch.Tensor  # packed codes, or the dequantized bf16 matrix
    scales: torch.Tensor | None

    @classmethod
    def build(cls, w1_rows: torch.Tensor, bits: int, group_size: int) -> "LowBitGuard":
        """Quantize ``w1_rows`` (m, d), neuron-major, to ``bits`` bits in groups along d."""
        w = w1_rows.detach().float()
        m, d = w.shape
        if bits == 8:
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
            codes = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
            if w.device.type == "cpu" and d >= _INT8_KERNEL_MIN_IN:
                return cls(8, d, "int8pack", codes.contiguous(), scale.to(torch.bfloat16))
            return cls(8, d, "dequantized", (codes.float() * scale[:, None]).to(torch.bfloat16), None)
        group = _fit_group(d, group_size)
        levels = (1 << bits) - 1
        wg = w.reshape(m, d // group, group)
        lo = wg.amin(dim=-1, keepdim=True)
        scale = ((wg.amax(dim=-1, keepdim=True) - lo) / levels).clamp(min=1e-12)
        codes = torch.round((wg - lo) / scale).clamp(0, levels)
        if w.device.type == "cpu" and group in _INT4_KERNEL_GROUPS and m % _INT4_KERNEL_OUT_MULTIPLE == 0:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes.reshape(m, d).to(torch.int32).contiguous(), 1)
            # The kernel dequantizes (q - 8) * scale + zero; ours is q * scale + lo.
            zero = lo + 8 * scale
            scales = torch.stack([scale.squeeze(-1).t(), zero.squeeze(-1).t()], dim=-1)
            return cls(bits, group, "int4pack", packed, scales.to(torch.bfloat16).contiguous())
        dequant = (codes * scale + lo).reshape(m, d).to(torch.bfloat16)
        return cls(bits, group, "dequantized", dequant, None)

    def predict(self, x2d: torch.Tensor) -> torch.Tensor:
        """Predicted ``x2d @ W1.T`` in float32, shape (T, m)."""
        xb = x2d.to(torch.bfloat16)
        if self.kernel == "int4pack":
            out = torch._weight_int4pack_mm_for_cpu(xb, self.weight, self.group_size, self.scales)
        elif self.kernel == "int8pack":
            out = torch._weight_int8pack_mm(xb, self.weight, self.scales)
        else:
            out = xb @ self.weight.t()
        return out.float()

    @property
    def bits_read(self) -> int:
        """Bits per weight the prediction actually reads (int2 sits in int4 containers)."""
        return {"int4pack": 4, "int8pack": 8, "dequantized": 16}[self.kernel]

    def bytes_read(self, m: int, d: int) -> int:
        """Bytes read per prediction: codes plus scales (and zeros)."""
        codes = m * d * self.bits_read // 8
        if self.kernel == "int4pack":
            return codes + m * (d // self.group_size) * 2 * 2
        if self.kernel == "int8pack":
            return codes + m * 2
        return codes


def _fit_group(d: int, group_size: int) -> int:
    """Largest group <= group_size dividing d (the packed kernel needs whole groups)."""
    group = min(group_size, d)
    while d % group:
        group -= 1
    return group
