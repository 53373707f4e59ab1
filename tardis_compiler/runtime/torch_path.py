"""The pack's FFN in torch ops: batched (prefill, batch > 1), any device, no host sync.

The same function as the fused kernel: ``y = Wf x + bf + sum_j mask[t, j] delta_j(x_t) out_j``
over the bundled neurons, with the guard's flags computed from the same codes (dequantized, float32
x). Instead of gathering flagged rows it computes every bundle's pre-activations with one GEMM and
masks the corrections, so its cost does not depend on which neurons are flagged and it never asks
the device how many were (no ``nonzero``: CUDA graphs and async execution stay possible). The
bundles are read in place through strided views.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import get_activation_rule
from .cpu.kernel import kernel
from .ffn_kind import ffn_kind
from .guard import LOW_BIT_ENCODINGS, predict
from .layout import DTYPES, NEURON_FLOATS, QSCALES, QUANTIZED_WEIGHTS, Layout, bundle_row, guard_codes_bytes
from .quantize import dequantize_bundles, dequantize_int4_bundles, dequantize_int4_rows


def guard_predictions(layout: Layout, x2: torch.Tensor, weights: torch.Tensor, guard: torch.Tensor,
                      floats: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The guard's float32 predictions (tokens, k_guard) of the guarded neurons' first
    pre-activations, bias excluded (their bands exclude it too).

    Example:
        >>> # guard_predictions(pack.layout, x, *pack.tensors())
    """
    kg, d = layout.k_guard, layout.d_in
    xf = x2.float()
    if not kg:
        return xf.new_zeros(x2.shape[0], 0)
    if (layout.guard in LOW_BIT_ENCODINGS and guard.device.type == "cpu" and layout.dtype in DTYPES
            and kernel() is not None):
        return kernel().guard_predict(x2.contiguous(), weights, guard, floats, meta, kg)
    if layout.guard in LOW_BIT_ENCODINGS:
        code_bytes = guard_codes_bytes(layout.guard, d, layout.group)
        codes = guard[:kg * code_bytes].view(kg, code_bytes)
        scales = guard[layout.off_gscales:layout.end_gscales].view(kg, -1)
        return predict(codes, scales, layout.guard, d, layout.group, x2)
    if layout.guard == "svd":
        q = guard[:kg * layout.rank * 4].view(torch.float32).view(kg, layout.rank)
        p = floats[layout.off_p:layout.off_qscales].view(layout.rank, d).float()
        return (xf @ p.t()) @ q.t()
    if layout.k_quant_bundles:  # "exact" over quantized bundles: their dequantized first rows, in float32
        return F.linear(x2.float(), all_bundles(layout, weights, guard, floats)[:kg, :d].float())
    return F.linear(x2, bundles(layout, weights)[:kg, :d]).float()  # "exact": the bundles' first rows


def bundles(layout: Layout, weights: torch.Tensor) -> torch.Tensor:
    """(k_dense_bundles, row) strided view of the bundles in ``weights``: no copy."""
    row = bundle_row(layout.kind, layout.d_in, layout.d_out)
    return weights[layout.off_bundles:layout.n_weights].view(layout.k_dense_bundles, layout.stride)[:, :row]


def all_bundles(layout: Layout, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor) -> torch.Tensor:
    """(k_bundles, row) bundles, guarded ones first: the view of ``bundles`` in the model's dtype,
    or the quantized ones dequantized (a copy; float32 with quantized weights) above the dense ones."""
    dense = bundles(layout, weights)
    kq = layout.k_quant_bundles
    if not kq:
        return dense
    data = guard[layout.off_qbundles:layout.off_qwf].view(kq, layout.qstride)
    if layout.bundles == "int4":
        return dequantize_int4_bundles(layout.kind, data, layout.d_in, layout.d_out)  # every bundle: int4 weights
    row = bundle_row(layout.kind, layout.d_in, layout.d_out)
    scales = floats[layout.off_qscales:layout.off_wfscales].view(kq, QSCALES).float()
    out_scales = floats[layout.off_oscales:layout.n_floats] if layout.weights == "int8" else None
    dtype = torch.float32 if layout.weights in QUANTIZED_WEIGHTS else weights.dtype
    quantized = dequantize_bundles(layout.kind, data[:, :row].view(torch.int8), scales, layout.d_in, dtype, out_scales)
    return torch.cat([quantized, dense.to(dtype)])


def folded_matrix(layout: Layout, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor) -> torch.Tensor:
    """Wf (d_out, d_in): a view of ``weights``, or with quantized weights its codes dequantized
    (float32, a copy)."""
    n, d = layout.d_out, layout.d_in
    if not layout.quant_wf:
        return weights[:n * d].view(n, d)
    if layout.weights == "int4":
        return dequantize_int4_rows(guard[layout.off_qwf:layout.n_guard].view(n, layout.qwf_row_bytes), d)
    codes = guard[layout.off_qwf:layout.n_guard].view(torch.int8).view(n, d)
    return codes.float() * floats[layout.off_wfscales:layout.off_oscales].float()[:, None]


def ffn_exact(x2: torch.Tensor, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor,
              layout: Layout) -> torch.Tensor:
    """The pack's FFN of ``x2`` (tokens, d_in) with every bundled neuron on its exact path and no guard:
    ``Wf x + bf + sum_j delta_j(x) out_j`` over all bundles, in the model's dtype as the dense FFN
    computes (the pack's biases and constants rounded to it). What calls above ``dense_above``
    run when the module keeps no dense weights: three GEMMs over the bundles read in place, about
    the dense FFN's cost, and at least as close to the dense FFN as the guarded result. Packs of
    int8 bundles dequantize them first (a copy: slow; ``ffn_op`` does not send them here).

    Example:
        >>> # y = ffn_exact(x, weights, guard, floats, pack.layout)
    """
    d, n, kb = layout.d_in, layout.d_out, layout.k_bundles
    dtype = torch.float32 if layout.weights in QUANTIZED_WEIGHTS else x2.dtype  # quantized weights: float32, as ffn_torch
    xw = x2.to(dtype)
    y = floats[:n].to(dtype).expand(x2.shape[0], n)
    if layout.has_wf:
        y = torch.addmm(y, xw, folded_matrix(layout, weights, guard, floats).to(dtype).t())
    if kb:
        b = all_bundles(layout, weights, guard, floats).to(dtype)
        nf = floats[layout.off_neuron:layout.off_p].view(kb, NEURON_FLOATS).to(dtype)
        spec = ffn_kind(layout.kind)
        z = F.linear(xw, b[:, :d], nf[:, 0])
        u = F.linear(xw, b[:, d:2 * d], nf[:, 1]) if spec.up_row is not None else None
        delta = spec.exact_delta(get_activation_rule(layout.activation).fn, z, u, nf[:, 2], nf[:, 3])
        y = torch.addmm(y, delta, b[:, d * spec.n_inputs:])
    elif not layout.has_wf:
        y = y.clone()
    return y.to(x2.dtype)


def ffn_torch(x2: torch.Tensor, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor,
              meta: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(y, flags): the FFN of ``x2`` (tokens, d_in) and the (tokens, k_bundles) flags it used.

    Example:
        >>> # y, flags = ffn_torch(x, *pack.tensors(), pack.layout)
    """
    d, n, kg, kb = layout.d_in, layout.d_out, layout.k_guard, layout.k_bundles
    compute = floats.dtype
    y = floats[:n].expand(x2.shape[0], n).clone()
    # quantized weights: float32 math on the dequantized weights, as the kernel computes
    xw = x2.float() if layout.weights in QUANTIZED_WEIGHTS else x2
    if layout.has_wf:
        y += F.linear(xw, folded_matrix(layout, weights, guard, floats)).to(compute)
    if not kb:
        return y.to(x2.dtype), None
    b = all_bundles(layout, weights, guard, floats)
    nf = floats[layout.off_neuron:layout.off_p].view(kb, NEURON_FLOATS)
    z = F.linear(xw, b[:, :d]).to(compute) + nf[:, 0]
    act = get_activation_rule(layout.activation).fn
    spec = ffn_kind(layout.kind)
    u = F.linear(xw, b[:, d:2 * d]).to(compute) + nf[:, 1] if spec.up_row is not None else None
    delta = spec.exact_delta(act, z, u, nf[:, 2], nf[:, 3])
    flags = torch.ones(x2.shape[0], kb, dtype=torch.bool, device=x2.device)
    if kg:
        z_hat = guard_predictions(layout, x2, weights, guard, floats, meta)
        bands = floats[layout.off_bands:layout.off_neuron].view(kg, 2).float()
        flags[:, :kg] = (z_hat < bands[:, 0]) | (z_hat > bands[:, 1]) | z_hat.isnan()
    delta = torch.where(flags, delta, torch.zeros((), dtype=compute, device=x2.device))
    out = b[:, d * spec.n_inputs:]
    y += (delta.to(out.dtype) @ out).to(compute)
    return y.to(x2.dtype), flags
