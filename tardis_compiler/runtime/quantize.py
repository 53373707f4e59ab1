"""Weight quantization of an FFN's pack: one home for the int8 codes and scales, and for the
*reference* a quantized pack reproduces.

A neuron's bundle is quantized per row: symmetric int8, ``scale = max|w| / 127``, one scale for its
first row, one for its up row (gated) and one for its output column (a column of W2 / W_d, which
is the neuron's row in the neuron-major views). The folded matrix ``Wf`` gets one scale per row.

With ``CalibrationConfig(weights="int8")`` the model a pack is exact against is the dense FFN whose
weights are those codes times their scales (``reference_weights``): calibration fits and prices
against it, and a ``guard="all"`` pack reproduces it up to float32 rounding. Its W_g / W_u rows
are quantized per output channel, as int8 weight-only libraries do; its W_d per input channel (a
scale per neuron), so that each bundle's codes and scale are the reference's own.
"""
from __future__ import annotations

import torch

from .ffn_kind import ffn_kind


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


def int8_bundles(kind: str, w: dict, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bundles of neurons ``idx`` as int8 codes (k, row) and their (k, 3) float32 scales
    (first row, up row, output column; a plain FFN's second is unused, 1.0).
    ``dequantize_bundles`` inverts it (up to rounding).

    Example:
        >>> w = {"w1_rows": torch.randn(4, 8), "w2_rows": torch.randn(4, 6)}
        >>> codes, scales = int8_bundles("plain", w, torch.arange(4))
        >>> codes.shape, scales.shape, int(codes.abs().max())
        (torch.Size([4, 14]), torch.Size([4, 3]), 127)
    """
    codes, scales = [], []
    for name in _scale_rows(kind):
        if name is None:  # plain: no up row; its scale slot is unused
            scales.append(torch.ones(idx.numel(), device=idx.device))
            continue
        q, scale = quantize_rows(w[name].detach().index_select(0, idx))
        codes.append(q)
        scales.append(scale)
    return torch.cat(codes, dim=1), torch.stack(scales, dim=1)


def dequantize_bundles(kind: str, codes: torch.Tensor, scales: torch.Tensor, d_in: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """(k, row) bundles in ``dtype`` from int8 ``codes`` and their (k, 3) ``scales``.

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
    return (codes.float() * per_column).to(dtype)


def reference_weights(kind: str, w: dict, weights: str | None) -> dict:
    """The weights a pack with ``weights`` encoding is exact against: ``w`` itself for None or
    "dense"; for "int8" float32 copies of the neuron-major matrices with every row replaced by its
    int8 codes times its scale (biases as they are). ``w`` is only read.

    Example:
        >>> w = {"w1_rows": torch.randn(4, 8), "b1": None, "w2_rows": torch.randn(4, 6), "b2": None}
        >>> ref = reference_weights("plain", w, "int8")
        >>> codes, scales = int8_bundles("plain", w, torch.arange(4))
        >>> torch.equal(ref["w1_rows"], codes[:, :8].float() * scales[:, :1])
        True
    """
    if weights in (None, "dense"):
        return w
    if weights != "int8":
        raise ValueError(f"weights must be None, 'dense' or 'int8', got {weights!r}")
    ref = dict(w)
    for name in _scale_rows(kind):
        if name is not None:
            codes, scale = quantize_rows(w[name])
            ref[name] = codes.float() * scale[:, None]
    return ref
