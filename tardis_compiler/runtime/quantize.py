"""Weight quantization of an FFN's pack: one home for the int8 codes and scales, and for the
*reference* a quantized pack reproduces.

int8 is symmetric, ``scale = max|w| / 127``. With ``CalibrationConfig(weights="int8")`` the model
a pack is exact against is the dense FFN whose weights are their codes times their scales
(``reference_weights``), every linear scaled per output channel as int8 weight-only libraries do
(torchao's ``Int8WeightOnlyConfig``): W1 / W_g / W_u one scale per neuron, W2 / W_d one per
output channel (``output_channel_scales``). Calibration fits and prices against that model, and a
``guard="all"`` pack reproduces it up to float32 rounding. A bundle then holds its rows' codes, the
scales of its first and up rows, and a unit scale for its output column, whose per-channel scales
the pack holds once (the kernel applies them to the sum of the corrections). The folded matrix
``Wf`` gets one scale per row. (Scaling W_d per neuron instead, as the int8 *bundles* of dense
packs do, cost SmolLM2-135M +2.3% perplexity against +0.0% per channel: docs/RESULTS.md.)

With ``weights="int4"`` every one of those rows (and each row of ``Wf``) is int4 instead, in groups
of ``layout.WEIGHT_GROUP`` along the row, each with a bfloat16 scale and minimum (asymmetric, as
torchao's int4 weight-only and llama.cpp's Q4_1 are): the sub-byte guards' own encoding
(``guard.quantize``), so one packing serves both. A row's bytes are its codes padded to 4 bytes,
then its (scale, minimum) pairs (``layout.int4_row_bytes``).
"""
from __future__ import annotations

import torch

from . import guard
from .ffn_kind import ffn_kind
from .layout import WEIGHT_GROUP, guard_codes_bytes, int4_codes_bytes, int4_row_bytes


def _scale_rows(kind: str) -> tuple[str | None, str | None, str]:
    """A kind's neuron-major weights in the order of a bundle's three scales (first row, up row,
    output column); None where the kind has no up row (its scale slot is unused)."""
    k = ffn_kind(kind)
    return k.first_row, k.up_row, k.out_row


def quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes (n, k) and float32 scales (n,) of ``rows``, one scale per row:
    ``max|row| / 127`` (rows of zeros get a tiny scale and zero codes).

    Example:
        >>> codes, scales = quantize_rows(torch.tensor([[1.0, -0.5], [0.0, 0.0]]))
        >>> codes.tolist(), scales.tolist()[1] > 0
        ([[127, -64], [0, 0]], True)
    """
    rows = rows.detach().float()
    scale = rows.abs().amax(dim=1).clamp(min=1e-30) / 127
    return torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def output_channel_scales(out_rows: torch.Tensor) -> torch.Tensor:
    """float32 (d_out,) int8 scales of an FFN's output linear per output channel, from its
    neuron-major rows (m, d_out): ``max_j |out_rows[j, i]| / 127`` over every neuron j.

    Example:
        >>> output_channel_scales(torch.tensor([[1.0, -0.5], [0.25, 2.0]])).mul(127).tolist()
        [1.0, 2.0]
    """
    return quantize_rows(out_rows.detach().t())[1]


def int8_bundles(kind: str, w: dict, idx: torch.Tensor,
                 out_scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundles of neurons ``idx`` as int8 codes (k, row) and their (k, 3) float32 scales
    (first row, up row, output column; a plain FFN's second is unused, 1.0). With ``out_scales``
    (d_out,) the output columns are coded per output channel against them and their bundle
    scale is 1.0 (a quantized pack); without, each gets its own scale (int8 bundles of a dense
    pack). ``dequantize_bundles`` inverts it (up to rounding).

    Example:
        >>> w = {"w1_rows": torch.randn(4, 8), "w2_rows": torch.randn(4, 6)}
        >>> codes, scales = int8_bundles("plain", w, torch.arange(4))
        >>> codes.shape, scales.shape, int(codes.abs().max())
        (torch.Size([4, 14]), torch.Size([4, 3]), 127)
    """
    codes, scales = [], []
    out_name = ffn_kind(kind).out_row
    for name in _scale_rows(kind):
        if name is None:  # plain: no up row; its scale slot is unused
            scales.append(torch.ones(idx.numel(), device=idx.device))
            continue
        rows = w[name].detach().index_select(0, idx)
        if name == out_name and out_scales is not None:
            q, scale = _codes(rows.float(), out_scales.to(rows.device)), torch.ones(idx.numel(), device=rows.device)
        else:
            q, scale = quantize_rows(rows)
        codes.append(q)
        scales.append(scale)
    return torch.cat(codes, dim=1), torch.stack(scales, dim=1)


def _codes(rows: torch.Tensor, column_scales: torch.Tensor) -> torch.Tensor:
    """int8 codes of float32 ``rows`` (k, n) against per-column scales (n,)."""
    return torch.round(rows / column_scales).clamp(-127, 127).to(torch.int8)


def dequantize_bundles(kind: str, codes: torch.Tensor, scales: torch.Tensor, d_in: int,
                       dtype: torch.dtype, out_scales: torch.Tensor | None = None) -> torch.Tensor:
    """(k, row) bundles in ``dtype`` from int8 ``codes``, their (k, 3) ``scales`` and, in a
    quantized pack, the output columns' per-channel ``out_scales`` (d_out,).

    Example:
        >>> w = {"w1_rows": torch.randn(4, 8), "w2_rows": torch.randn(4, 6)}
        >>> codes, scales = int8_bundles("plain", w, torch.arange(4))
        >>> b = dequantize_bundles("plain", codes, scales, 8, torch.float32)
        >>> bool((b[:, :8] - w["w1_rows"]).abs().max() <= scales[:, :1].max() / 2 + 1e-6)
        True
    """
    first = ffn_kind(kind).n_inputs * d_in
    per_column = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    per_column[:, :d_in] = scales[:, :1]
    per_column[:, d_in:first] = scales[:, 1:2]  # the up rows' (none for a one-input kind)
    per_column[:, first:] = scales[:, 2:3]
    if out_scales is not None:
        per_column[:, first:] *= out_scales.float()
    return (codes.float() * per_column).to(dtype)


def int4_rows(rows: torch.Tensor) -> torch.Tensor:
    """(n, int4_row_bytes(k)) uint8: each row of ``rows`` (n, k) as int4 codes padded to 4 bytes,
    then its bf16 (scale, minimum) pairs, one per group of ``WEIGHT_GROUP``.

    Example:
        >>> int4_rows(torch.randn(3, 40)).shape     # 20 bytes of codes, 2 groups x 4 bytes
        torch.Size([3, 28])
    """
    n, k = rows.shape
    codes, scales = guard.quantize(rows, "int4", WEIGHT_GROUP)
    pad = int4_codes_bytes(k) - codes.shape[1]
    return torch.cat([torch.nn.functional.pad(codes, (0, pad)), scales], dim=1)


def dequantize_int4_rows(data: torch.Tensor, k: int) -> torch.Tensor:
    """The float32 (n, k) rows that ``int4_rows`` encoded into ``data`` (n, int4_row_bytes(k)).

    Example:
        >>> w = torch.randn(3, 40)
        >>> bool((dequantize_int4_rows(int4_rows(w), 40) - w).abs().max() < w.abs().max() / 7)
        True
    """
    codes = data[:, :guard_codes_bytes("int4", k, WEIGHT_GROUP)]
    scales = data[:, int4_codes_bytes(k):int4_row_bytes(k)].contiguous()
    return guard.dequantize(codes.contiguous(), scales, "int4", k, WEIGHT_GROUP)


def int4_bundles(kind: str, w: dict, idx: torch.Tensor) -> torch.Tensor:
    """The bundles of neurons ``idx`` as int4 rows back to back (first, up, output): (k, bytes) uint8.

    Example:
        >>> w = {"w1_rows": torch.randn(4, 8), "w2_rows": torch.randn(4, 6)}
        >>> int4_bundles("plain", w, torch.arange(4)).shape    # (4 + 4) + (4 + 4) bytes
        torch.Size([4, 16])
    """
    return torch.cat([int4_rows(w[name].detach().index_select(0, idx)) for name in ffn_kind(kind).rows], dim=1)


def dequantize_int4_bundles(kind: str, data: torch.Tensor, d_in: int, d_out: int) -> torch.Tensor:
    """(k, row) float32 bundles ``[first | up | out]`` from their int4 bytes (``int4_bundles``).

    Example:
        >>> w = {"w1_rows": torch.randn(4, 8), "w2_rows": torch.randn(4, 6)}
        >>> dequantize_int4_bundles("plain", int4_bundles("plain", w, torch.arange(4)), 8, 6).shape
        torch.Size([4, 14])
    """
    parts, offset = [], 0
    for length in [d_in] * ffn_kind(kind).n_inputs + [d_out]:
        size = int4_row_bytes(length)
        parts.append(dequantize_int4_rows(data[:, offset:offset + size], length))
        offset += size
    return torch.cat(parts, dim=1)


def reference_weights(kind: str, w: dict, weights: str | None) -> dict:
    """The weights a pack with ``weights`` encoding is exact against: ``w`` itself for None or
    "dense"; for "int8" float32 copies of the neuron-major matrices with every weight replaced by
    its int8 code times its scale (per output channel of each linear), for "int4" every row by its
    int4 groups' values (biases as they are). ``w`` is only read.

    Example:
        >>> w = {"w1_rows": torch.randn(4, 8), "b1": None, "w2_rows": torch.randn(4, 6), "b2": None}
        >>> ref = reference_weights("plain", w, "int8")
        >>> codes, scales = int8_bundles("plain", w, torch.arange(4))
        >>> torch.equal(ref["w1_rows"], codes[:, :8].float() * scales[:, :1])
        True
    """
    if weights in (None, "dense"):
        return w
    if weights not in ("int8", "int4"):
        raise ValueError(f"weights must be None, 'dense', 'int8' or 'int4', got {weights!r}")
    ref = dict(w)
    out_name = ffn_kind(kind).out_row
    for name in _scale_rows(kind):
        if name is None:
            continue
        if weights == "int8" and name == out_name:  # W2 / W_d: a scale per output channel
            scales = output_channel_scales(w[name])
            ref[name] = _codes(w[name].detach().float(), scales).float() * scales
        elif weights == "int4":
            ref[name] = dequantize_int4_rows(int4_rows(w[name]), w[name].shape[1]).to(w[name].device)
        else:
            codes, scale = quantize_rows(w[name])
            ref[name] = codes.float() * scale[:, None]
    return ref
