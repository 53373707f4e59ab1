"""The online guard: a low-bit copy of the first weight rows that predicts ``z = W1 x`` cheaply.

The one home of the guard's encoding, shared by the fused kernel (which reads these bytes), the
torch path and calibration (which measures the prediction error of exactly this arithmetic):

* int8: symmetric, one float32 scale per row: ``w ~= scale * q``, q in [-127, 127].
* int4 / int2: asymmetric groups of ``group_size`` along the row (the last one may be shorter),
  a bf16 scale and minimum per group: ``w ~= low + scale * q``, q in [0, 2^bits). Codes are
  packed so that unpacking is a shift and a mask: in a group of ``s`` elements with
  ``part = ceil(s / per_byte)``, byte ``b`` holds element ``b + k * part`` in bits
  ``[k * bits, (k + 1) * bits)``. int2 really reads 2 bits per weight.

The prediction (``predict``), which the fused kernel computes too (in another summation order,
so the two agree to float32 rounding), and which calibration measures the guard through:

* int8: ``x @ (scale * q).T`` with x in float32;
* int4 / int2: x is quantized to int8 per group as well (``xq = round(x / sx)``,
  ``sx = max|x_g| / 127``), so the kernel can multiply 64 codes by 64 int8 activations in one
  VNNI instruction: ``sum_g scale_g sx_g (q_g . xq_g) + low_g sum(x_g)``. The activation rounding
  adds ~1% of the int4 weight rounding's error to the prediction; calibration sees it all.
"""
from __future__ import annotations

import dataclasses

import torch

from .layout import group_sizes, guard_codes_bytes, guard_row_bytes

LOW_BIT_ENCODINGS = {"int8": 8, "int4": 4, "int2": 2}


def quantize(w_rows: torch.Tensor, encoding: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (codes, scales) bytes of ``w_rows`` (rows, d) in ``encoding``: uint8 tensors of
    (rows, codes bytes per row) and (rows, scale bytes per row).

    Example:
        >>> codes, scales = quantize(torch.randn(3, 70), "int4", 64)
        >>> codes.shape, scales.shape           # 32 + 3 bytes of codes, 2 groups x 4 bytes of scales
        (torch.Size([3, 35]), torch.Size([3, 8]))
    """
    w = w_rows.detach().float().cpu()
    rows, d = w.shape
    if encoding == "int8":
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-30)
        codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return codes.view(torch.uint8), scale[:, None].contiguous().view(torch.uint8)
    bits = LOW_BIT_ENCODINGS[encoding]
    levels, per_byte = (1 << bits) - 1, 8 // bits
    code_parts, scale_parts, start = [], [], 0
    for size in group_sizes(d, group_size):
        chunk = w[:, start:start + size]
        start += size
        low = chunk.amin(dim=1).to(torch.bfloat16)
        scale = ((chunk.amax(dim=1) - low.float()) / levels).clamp(min=1e-30).to(torch.bfloat16)
        q = torch.round((chunk - low.float()[:, None]) / scale.float()[:, None]).clamp(0, levels).to(torch.int32)
        part = -(-size // per_byte)
        q = torch.nn.functional.pad(q, (0, part * per_byte - size)).reshape(rows, per_byte, part)
        packed = sum(q[:, k] << (k * bits) for k in range(per_byte))
        code_parts.append(packed.to(torch.uint8))
        scale_parts.append(torch.stack([scale, low], dim=1))
    codes = torch.cat(code_parts, dim=1)
    scales = torch.cat(scale_parts, dim=1).contiguous().view(torch.uint8)
    return codes.contiguous(), scales.contiguous()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, encoding: str, d_in: int, group_size: int) -> torch.Tensor:
    """The float32 (rows, d_in) weights that ``quantize`` encoded (what the guard predicts with).

    Example:
        >>> w = torch.randn(4, 64)
        >>> codes, scales = quantize(w, "int8", 64)
        >>> bool((dequantize(codes, scales, "int8", 64, 64) - w).abs().max() < w.abs().max() / 127)
        True
    """
    rows = codes.shape[0]
    if encoding == "int8":
        return codes.view(torch.int8).float() * scales.view(torch.float32)
    bits = LOW_BIT_ENCODINGS[encoding]
    per_byte = 8 // bits
    pairs = scales.view(torch.bfloat16).float().reshape(rows, -1, 2)
    out, offset = [], 0
    for g, size in enumerate(group_sizes(d_in, group_size)):
        part = -(-size // per_byte)
        b = codes[:, offset:offset + part].to(torch.int32)
        offset += part
        q = torch.stack([(b >> (k * bits)) & ((1 << bits) - 1) for k in range(per_byte)], dim=1)
        q = q.reshape(rows, per_byte * part)[:, :size].float()
        out.append(q * pairs[:, g, 0:1] + pairs[:, g, 1:2])
    return torch.cat(out, dim=1)


def decode(codes: torch.Tensor, scales: torch.Tensor, encoding: str, d_in: int, group_size: int
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale * code per element, (rows, d_in); each group's minimum, (rows, groups) or None for int8).

    Example:
        >>> codes, scales = quantize(torch.randn(2, 70), "int4", 64)
        >>> [t.shape for t in decode(codes, scales, "int4", 70, 64)]
        [torch.Size([2, 70]), torch.Size([2, 2])]
    """
    if encoding == "int8":
        return dequantize(codes, scales, encoding, d_in, group_size), None
    rows = codes.shape[0]
    pairs = scales.view(torch.bfloat16).float().reshape(rows, -1, 2)
    lows = pairs[:, :, 1].contiguous()
    full = dequantize(codes, scales, encoding, d_in, group_size)  # low + scale * q
    expand = torch.repeat_interleave(lows, torch.tensor(group_sizes(d_in, group_size)), dim=1)
    return full - expand, lows


def quantize_activations(x: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x rounded to int8 per group and scaled back, float32; the exact sum of x per group): the
    input the sub-byte guards read (the fused kernel rounds identically).

    Example:
        >>> x_deq, sums = quantize_activations(torch.tensor([[0.5, -1.0, 0.25]]), 64)
        >>> (x_deq * 127).round().tolist(), sums.tolist()     # multiples of max|x| / 127
        ([[64.0, -127.0, 32.0]], [[-0.25]])
    """
    x = x.float()
    out, sums, start = [], [], 0
    for size in group_sizes(x.shape[1], group_size):
        chunk = x[:, start:start + size]
        start += size
        scale = chunk.abs().amax(dim=1, keepdim=True) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        out.append((chunk / scale).round().clamp(-127, 127) * scale)
        sums.append(chunk.sum(dim=1, keepdim=True))
    return torch.cat(out, dim=1), torch.cat(sums, dim=1)


def predict(codes: torch.Tensor, scales: torch.Tensor, encoding: str, d_in: int, group_size: int,
            x: torch.Tensor, decoded: tuple | None = None) -> torch.Tensor:
    """The guard's float32 prediction (tokens, rows) of ``x @ W.T`` (module docstring); ``decoded``
    reuses a ``decode`` result.

    Example:
        >>> w, x = torch.randn(8, 64), torch.randn(3, 64)
        >>> codes, scales = quantize(w, "int4", 64)
        >>> bool(((predict(codes, scales, "int4", 64, 64, x) - x @ w.T).norm() / (x @ w.T).norm()) < 0.2)
        True
    """
    scaled, lows = decoded if decoded is not None else decode(codes, scales, encoding, d_in, group_size)
    scaled = scaled.to(x.device)
    if lows is None:
        return x.float() @ scaled.t()
    x_deq, sums = quantize_activations(x, group_size)
    return x_deq @ scaled.t() + sums @ lows.to(x.device).t()


@dataclasses.dataclass
class LowBitGuard:
    """A quantized neuron-major W1 (rows, d) that predicts ``x @ W1.T`` (bias not included).

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
    codes: torch.Tensor  # uint8 (rows, code bytes per row)
    scales: torch.Tensor  # uint8 (rows, scale bytes per row)
    d_in: int
    _decoded: tuple | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def build(cls, w1_rows: torch.Tensor, bits: int, group_size: int) -> "LowBitGuard":
        """Quantize ``w1_rows`` (m, d), neuron-major, to ``bits`` bits (8: per row; 4, 2: per group)."""
        codes, scales = quantize(w1_rows, cls.encoding_of(bits), group_size)
        return cls(bits, group_size, codes, scales, w1_rows.shape[1])

    @staticmethod
    def encoding_of(bits: int) -> str:
        """``"int8"``, ``"int4"`` or ``"int2"``."""
        return f"int{bits}"

    @property
    def kernel(self) -> str:
        """The encoding's name (what reports show)."""
        return self.encoding_of(self.bits)

    def predict(self, x2d: torch.Tensor) -> torch.Tensor:
        """Predicted ``x2d @ W1.T`` in float32, shape (T, m), as the kernel computes it."""
        if self._decoded is None:
            self._decoded = decode(self.codes, self.scales, self.kernel, self.d_in, self.group_size)
        return predict(self.codes, self.scales, self.kernel, self.d_in, self.group_size, x2d, self._decoded)

    @property
    def bits_read(self) -> int:
        """Bits per weight the prediction reads (scales not included)."""
        return self.bits

    def bytes_read(self, m: int, d: int) -> int:
        """Bytes read per prediction over ``m`` rows of ``d``: codes plus scales."""
        return m * guard_row_bytes(self.kernel, d, self.group_size)

    def code_bytes(self) -> int:
        """Bytes of one row's codes."""
        return guard_codes_bytes(self.kernel, self.d_in, self.group_size)
