"""``QuantizedLinear``: a weight-only int8 or int4 ``nn.Linear``, for the linears no FFN pack covers.

``compress_(model, profile, other_linears="int8" | "int4")`` (``tardis_compiler/compress.py``)
replaces, in place, every ``nn.Linear`` outside a compressed FFN (attention projections, the LM
head, the linears of FFNs left dense) by one of these. It holds plain tensors only (buffers of
int8 / uint8 codes and float scales, the bias as it was), so ``save_pretrained`` writes them to
safetensors and the ``"tardis"`` quantizer rebuilds them (``hf/quantizer.py``); nothing is pickled.

- int8: symmetric, per output channel. ``scale = max|w_row| / 127`` (in the model's dtype, as the
  op takes it), ``qweight = round(w / scale)`` clamped to [-127, 127], int8 (out, in). Forward:
  ``torch._weight_int8pack_mm`` (torch's packed int8 GEMV) on the CPU for float32, bfloat16 and
  float16 inputs whose dtype is the scales'; elsewhere (CUDA, which has no kernel for it; float64;
  another input dtype) a dequantize-then-``F.linear`` fallback computing the same function.
- int4: asymmetric, groups of ``group`` (default 32) inputs per output channel, in torch's tinygemm
  convention: ``w = (q - 8) * scale + zero`` with ``q`` in [0, 15], ``scale = (max - min) / 15`` and
  ``zero = min + 8 scale`` per group. ``scales_and_zeros`` is (in / group, out, 2) in the model's
  dtype, the op's own layout. The checkpoint stores the codes *portably*, ``qweight`` uint8
  (out, in / 2), two per byte, the even input column in the low nibble. torch's CPU op
  (``torch._weight_int4pack_mm_for_cpu``) wants them repacked by
  ``torch._convert_weight_to_int4pack_for_cpu``, whose layout depends on the CPU's vector ISA
  (64-row blocks with AVX-512, 32 without): that repacking is done in place when the module is built
  or loaded on a CPU (``prepare``), and undone when it is saved or moved (``portable_qweight``), so
  one copy of the codes is held. Where the op cannot run (not on a CPU, ``out % 16 != 0``) the
  forward dequantizes the portable codes instead (same function, slower).

``weight`` is an empty (0-element) buffer, as ``TardisFFN``'s ``dense_key`` mark: a checkpoint loaded
into the dense architecture without tardis_compiler then fails loudly on that size mismatch, rather
than running with a randomly initialised linear.

``.to(dtype)`` moves devices but keeps the codes', scales' and bias's dtypes (as ``TardisFFN`` does:
a checkpoint's config records them); an input in another dtype takes the dequantizing path.

Why not torchao: it is not a dependency of this package, and its quantized weights are tensor
subclasses: ``safetensors.torch.save_file`` of a torchao state dict fails ("Attempted to access the
data pointer on an invalid python storage", torchao 0.18.0, for ``Int8WeightOnlyConfig``'s
``Int8Tensor`` and the prototype CPU int4 ``Int4OpaqueTensor`` alike), and its stable
``Int4WeightOnlyConfig`` needs a further package (``mslk``) here. Two torch ops (the ones torchao's
CPU paths call) and plain tensors are enough.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
import torch.nn.functional as F

#: ``compress_(other_linears=...)`` values -> bits.
OTHER_LINEARS = {"int8": 8, "int4": 4}
#: Input columns per int4 scale (torch's CPU op takes 32, 64, 128 or 256).
INT4_GROUP = 32
INT4_GROUPS = (32, 64, 128, 256)
#: Version of ``QuantizedLinear.spec()``; a checkpoint with another is refused.
SPEC_VERSION = 1
#: Model dtypes a QuantizedLinear can be built in (the scales' dtype).
ELEMENT_TYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float64": torch.float64}
_OP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what torch's int8 / int4 CPU ops take
_UNPACK_ROWS = 256  # identity rows per step when reading the CPU layout back (bounds the temporary)


class QuantizedLinear(torch.nn.Module):
    """A linear layer with int8 (per output channel) or int4 (grouped) weights; see the module docstring.

    Example:
        >>> lin = torch.nn.Linear(64, 32)
        >>> q8, q4 = QuantizedLinear.from_linear(lin, 8), QuantizedLinear.from_linear(lin, 4)
        >>> x = torch.randn(3, 64)
        >>> torch.allclose(q8(x), F.linear(x, q8.dequantize(), lin.bias), atol=1e-5)
        True
        >>> torch.allclose(q4(x), F.linear(x, q4.dequantize(), lin.bias), atol=1e-5)
        True
        >>> q8.qweight.dtype, q8.resident_bytes() < lin.weight.numel() * 4
        (torch.int8, True)
    """

    def __init__(self, in_features: int, out_features: int, bits: int, bias: bool = True,
                 dtype: torch.dtype = torch.float32, group: int = INT4_GROUP,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        check_shape(in_features, out_features, bits, group if bits == 4 else 0)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group = group if bits == 4 else 0
        self.cpu_layout = False  # int4: whether ``qweight`` holds torch's CPU layout (see ``prepare``)
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales_and_zeros", torch.ones(in_features // group, out_features, 2, dtype=dtype,
                                                                device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                       requires_grad=False) if bias else None
        self.register_buffer("weight", torch.zeros(0, dtype=dtype, device=device))  # the empty mark

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype the scales are in (and the op's input dtype)."""
        return (self.scale if self.bits == 8 else self.scales_and_zeros).dtype

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, bits: int, group: int = INT4_GROUP) -> "QuantizedLinear":
        """``linear`` quantized (its weight is read, not changed), ready to run."""
        w = linear.weight.detach()
        out_features, in_features = w.shape
        module = cls(in_features, out_features, bits, linear.bias is not None, w.dtype, group, device="meta")
        with torch.no_grad():
            if bits == 8:
                module.qweight, module.scale = quantize_int8(w)
            else:
                module.qweight, module.scales_and_zeros = quantize_int4(w, group)
            if linear.bias is not None:
                module.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
            module.weight = torch.zeros(0, dtype=w.dtype, device=w.device)
        return module.prepare()

    @classmethod
    def empty(cls, spec: dict[str, Any], device: torch.device | str | None = None) -> "QuantizedLinear":
        """A module of the shapes ``spec`` (from ``spec()``, checked by ``check_spec``) describes."""
        return cls(spec["in_features"], spec["out_features"], spec["bits"], spec["bias"],
                   ELEMENT_TYPES[spec["element_type"]], spec["group"] or INT4_GROUP, device=device)

    def spec(self) -> dict[str, Any]:
        """JSON-able shapes of this module, with the sha256 of its tensors as saved."""
        return {"spec_version": SPEC_VERSION, "bits": self.bits, "group": self.group,
                "in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "element_type": str(self.dtype).removeprefix("torch."), "sha256": self.digest()}

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores under this module, the empty ``weight`` mark aside: name -> tensor
        (int4 codes in the portable layout)."""
        out = {"qweight": self.portable_qweight()}
        out.update({"scale": self.scale} if self.bits == 8 else {"scales_and_zeros": self.scales_and_zeros})
        if self.bias is not None:
            out["bias"] = self.bias.detach()
        return out

    def digest(self) -> str:
        """sha256 of ``saved_tensors()``: their names, dtypes, shapes and bytes."""
        h = hashlib.sha256()
        for name, t in self.saved_tensors().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        return h.hexdigest()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight this module computes with, in ``dtype`` (default: the model's)."""
        dtype = dtype or self.dtype
        if self.bits == 8:
            return self.qweight.to(dtype) * self.scale.to(dtype)[:, None]
        codes = unpack_nibbles(self.portable_qweight()).to(dtype)
        codes = codes.reshape(self.out_features, self.in_features // self.group, self.group)
        sz = self.scales_and_zeros.to(dtype).transpose(0, 1)  # (out, groups, 2)
        return ((codes - 8) * sz[..., :1] + sz[..., 1:]).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        fast = x.device.type == "cpu" and x.dtype == self.dtype and x.dtype in _OP_DTYPES
        if fast and self.bits == 8:
            y = torch._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale)
        elif fast and self.cpu_layout:
            y = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), self.qweight, self.group, self.scales_and_zeros)
        else:
            return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    # --- int4: torch's CPU layout, held in place of the portable codes -------------------------------
    def prepare(self) -> "QuantizedLinear":
        """Repack int4 codes into torch's CPU layout when the op can run here (a no-op for int8,
        off the CPU, or once done); call after loading portable codes into ``qweight``."""
        if self.bits == 4 and not self.cpu_layout and self.qweight.device.type == "cpu" \
                and self.out_features % 16 == 0:
            codes = unpack_nibbles(self.qweight).to(torch.int32)
            self.qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            self.cpu_layout = True
        return self

    def portable_qweight(self) -> torch.Tensor:
        """``qweight`` in the layout a checkpoint stores (int4: read back from torch's CPU layout)."""
        if not self.cpu_layout:
            return self.qweight
        # The op with an identity input returns the dequantized weight; float32 scales and zeros make
        # (q - 8) * scale + zero exact enough to recover each code, and repacking must give back the
        # very bytes held, so a change of torch's layout is an error here, never wrong codes.
        sz = self.scales_and_zeros.float()
        rows = []
        for start in range(0, self.in_features, _UNPACK_ROWS):
            eye = torch.eye(self.in_features, dtype=torch.float32)[start:start + _UNPACK_ROWS]
            rows.append(torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.qweight, self.group, sz))
        w = torch.cat(rows).t().reshape(self.out_features, -1, self.group)
        scale, zero = sz.transpose(0, 1)[..., :1], sz.transpose(0, 1)[..., 1:]
        codes = ((w - zero) / scale + 8).round().clamp(0, 15).to(torch.int32).reshape(self.out_features, -1)
        if not torch.equal(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), self.qweight):
            raise RuntimeError("QuantizedLinear: torch's int4 CPU layout could not be read back; save on the "
                               "machine and torch version that built it, or report this torch version")
        return pack_nibbles(codes.to(torch.uint8))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.cpu_layout:
            destination[prefix + "qweight"] = self.portable_qweight()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self.cpu_layout = False  # what loads is the portable layout
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.prepare()

    def _apply(self, fn, recurse: bool = True):
        # Devices move, dtypes stay (as TardisFFN's: the checkpoint's config records them); a call in
        # another dtype takes the dequantizing path. Moves see the portable codes, repacked after on a CPU.
        if self.cpu_layout:
            self.qweight, self.cpu_layout = self.portable_qweight(), False
        for key, tensor in self._buffers.items():
            if tensor is not None:
                moved = fn(tensor)
                self._buffers[key] = moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
        if self.bias is not None:
            moved = fn(self.bias.data)
            moved = moved if moved.dtype == self.bias.dtype else self.bias.data.to(moved.device)
            self.bias = torch.nn.Parameter(moved, requires_grad=False)
        return self.prepare()

    def resident_bytes(self) -> int:
        """Bytes this module holds (codes, scales, bias)."""
        return sum(t.numel() * t.element_size() for t in (*self.buffers(), *self.parameters()))

    def extra_repr(self) -> str:
        kind = f"int4, group={self.group}" if self.bits == 4 else "int8"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"bias={self.bias is not None}, {self.dtype}")


def check_shape(in_features: Any, out_features: Any, bits: Any, group: Any) -> None:
    """ValueError unless these are shapes a QuantizedLinear can have (int4: ``in`` a multiple of ``group``).

    Example:
        >>> check_shape(576, 192, 4, 32)
        >>> check_shape(48, 16, 4, 32)
        Traceback (most recent call last):
        ...
        ValueError: int4 needs in_features a multiple of the group 32, got 48
    """
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 2 ** 24:
            raise ValueError(f"{name} must be an integer in [1, 2^24], got {value!r}")
    if bits not in (4, 8) or isinstance(bits, bool):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if bits == 8 and group != 0:
        raise ValueError(f"int8 has no group (0), got {group!r}")
    if bits == 4 and group not in INT4_GROUPS:
        raise ValueError(f"int4 group must be one of {INT4_GROUPS}, got {group!r}")
    if bits == 4 and in_features % group:
        raise ValueError(f"int4 needs in_features a multiple of the group {group}, got {in_features}")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes (out, in), scales (out,) in ``w``'s dtype) of ``w``, per output channel.

    Example:
        >>> q, s = quantize_int8(torch.tensor([[1.0, -0.5], [0.0, 0.0]]))
        >>> q.tolist(), bool(s[1] > 0)
        ([[127, -64], [0, 0]], True)
    """
    scale = (w.detach().float().abs().amax(1) / 127).to(w.dtype).clamp(min=torch.finfo(w.dtype).tiny)
    q = (w.detach().float() / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(portable uint8 codes (out, in / 2), scales_and_zeros (in / group, out, 2) in ``w``'s dtype) of
    ``w``: asymmetric per group of ``group`` inputs, ``w ~ (q - 8) * scale + zero``.

    Example:
        >>> q, sz = quantize_int4(torch.arange(32.0)[None])
        >>> q.shape, sz.shape, unpack_nibbles(q)[0, :3].tolist()
        (torch.Size([1, 16]), torch.Size([1, 1, 2]), [0, 0, 1])
    """
    out_features, in_features = w.shape
    check_shape(in_features, out_features, 4, group)
    wg = w.detach().float().reshape(out_features, in_features // group, group)
    low, high = wg.amin(-1), wg.amax(-1)
    scale = ((high - low) / 15).to(w.dtype).clamp(min=torch.finfo(w.dtype).tiny)
    zero = (low + 8 * scale.float()).to(w.dtype)
    codes = ((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).round().clamp(0, 15)
    sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (groups, out, 2)
    return pack_nibbles(codes.reshape(out_features, in_features).to(torch.uint8)), sz


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(n, k) codes in [0, 15] -> (n, k / 2) uint8, the even column in the low nibble.

    Example:
        >>> pack_nibbles(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)).tolist()
        [[33, 15]]
    """
    codes = codes.to(torch.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_nibbles``: (n, k / 2) uint8 -> (n, k) uint8 codes.

    Example:
        >>> unpack_nibbles(torch.tensor([[33, 15]], dtype=torch.uint8)).tolist()
        [[1, 2, 15, 0]]
    """
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def held_bytes(in_features: int, out_features: int, bits: int, bias: bool, dtype: torch.dtype,
               group: int = INT4_GROUP) -> int:
    """Bytes a QuantizedLinear of these shapes holds (what ``resident_bytes`` returns).

    Example:
        >>> held_bytes(576, 576, 8, False, torch.bfloat16), held_bytes(576, 576, 4, False, torch.bfloat16)
        (332928, 207360)
    """
    size = torch.empty(0, dtype=dtype).element_size()
    codes = out_features * in_features if bits == 8 else out_features * in_features // 2
    scales = out_features * size if bits == 8 else math.prod((in_features // group, out_features, 2)) * size
    return codes + scales + (out_features * size if bias else 0)
