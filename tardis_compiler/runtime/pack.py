"""Build an FFN's pack: the fold, the guard and the per-neuron bundles, once, from its weights
and calibration (layout in ``runtime/layout.py``).

The per-neuron calibration comes as the (6, m) rows of ``FFNProfile.params``: slope, intercept,
lower, upper, and the guard's flag band (lower/upper with the margins applied); with the "svd"
guard its factors ``[Q^T | P]`` follow below (``split_params``). The band encodes each neuron's
option: an empty band (lo > hi) flags it for every token (always exact), an unbounded one never
(folded unguarded or dropped: no bundle is kept), anything else is guarded.

Every neuron's line (plain: ``a z + c``; gated: the constant ``c``) folds into ``Wf``; the exact
path adds ``delta`` for the flagged ones, which is exact for any superset of the out-of-range
neurons: ``guard="all"`` (every neuron always exact) reproduces the dense FFN. A calibration may
add a least-squares term ``[W | b]`` for the neurons folded without a guard
(``calibrate/lstsq_fold.py``): it joins ``Wf`` and the folded bias, except with ``guard="all"``,
where no neuron is folded.
"""
from __future__ import annotations

import dataclasses

import torch

from .ffn_kind import ffn_kind
from .guard import LOW_BIT_ENCODINGS, quantize
from .layout import BUNDLE_ENCODINGS, NEURON_FLOATS, QUANTIZED_WEIGHTS, WEIGHT_ENCODINGS, Layout, bundle_row
from .quantize import (dequantize_bundles, int4_bundles, int4_rows, int8_bundles,  # noqa: F401 (re-exported)
                       output_channel_scales, quantize_rows, reference_weights)
from .validate import compute_dtype, validate_pack

#: Guards a pack can be built for; "all" flags every neuron (the exactness check).
PACK_GUARDS = (*LOW_BIT_ENCODINGS, "svd", "exact", "all")


def bundle_encoding(bundles: str, guard: str, k_guard: int = 1) -> str:
    """The encoding the guarded bundles get: ``bundles``, except "dense" when there are no guarded
    neurons (``guard="all"``: the exactness check keeps every row as it is) and with the "exact"
    guard (it reads the bundles' own first rows).

    Example:
        >>> bundle_encoding("int8", "int4", 10), bundle_encoding("int8", "all", 0), bundle_encoding("int8", "exact")
        ('int8', 'dense', 'dense')
    """
    if bundles not in BUNDLE_ENCODINGS:
        raise ValueError(f"bundles must be one of {sorted(BUNDLE_ENCODINGS)}, got {bundles!r}")
    return bundles if k_guard and guard not in ("exact", "all") else "dense"


@dataclasses.dataclass(eq=False)
class FFNPack:
    """What the fused op reads for one FFN: four tensors, the activation's name, and which neuron
    each bundle belongs to (for reports; the kernel does not read it).

    Example:
        >>> w = {"w1_rows": torch.randn(16, 8), "b1": None, "w2_rows": torch.randn(16, 8), "b2": None}
        >>> params = torch.zeros(6, 16); params[0] = 1.0                  # the line z -> z
        >>> pack = build_pack("plain", w, params, "all", "relu", 64)
        >>> pack.layout.k_always, pack.layout.k_guard
        (16, 0)
    """

    weights: torch.Tensor  # model dtype, 1-D: Wf, then the bundles
    guard: torch.Tensor  # uint8, 1-D: guard codes, then scales
    floats: torch.Tensor  # float32 (float64 for float64 models), 1-D
    meta: torch.Tensor  # int64, the layout's fields
    activation: str
    neurons: torch.Tensor  # int64 (k_bundles,): the neuron of each bundle
    layout: Layout

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights, guard, floats, meta): the op's tensor arguments after x."""
        return self.weights, self.guard, self.floats, self.meta

    def to(self, device: torch.device | str) -> "FFNPack":
        """The pack on ``device``; ``meta`` stays on the CPU, where the op reads it without a sync."""
        weights, guard, floats = (t.to(device) for t in (self.weights, self.guard, self.floats))
        return FFNPack(weights, guard, floats, self.meta, self.activation, self.neurons, self.layout)


def split_params(params: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An FFN's calibration tensor as its (6, m) per-neuron rows and, with the "svd" guard, the
    predictor rows (r, m + d_in) below them: ``[Q^T | P]`` of ``SVDPredictor``.

    Example:
        >>> rows, predictor = split_params(torch.zeros(6, 8), 8)
        >>> rows.shape, predictor
        (torch.Size([6, 8]), None)
    """
    if params.shape[0] == 6:
        return params, None
    return params[:6, :m], params[6:]


def neuron_classes(params: torch.Tensor, guard: str, m: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(guarded, always-exact) neuron ids of a calibration of ``m`` neurons (default: the width of
    ``params``, which with the svd factors below is m + d_in): see the module docstring.

    Example:
        >>> inf = float("inf")
        >>> p = torch.tensor([[0.] * 3, [0.] * 3, [-1., inf, -inf], [1., -inf, inf], [-1., inf, -inf], [1., -inf, inf]])
        >>> [t.tolist() for t in neuron_classes(p, "int8")]      # guarded, exact, folded
        [[0], [1]]
    """
    m = params.shape[1] if m is None else m
    if guard == "all":
        return torch.zeros(0, dtype=torch.long), torch.arange(m)
    rows, _ = split_params(params, m)
    band_lo, band_hi = rows[4], rows[5]
    always = (band_lo > band_hi) | (rows[2] > rows[3])
    guarded = (torch.isfinite(band_lo) | torch.isfinite(band_hi)) & ~always
    return guarded.nonzero().squeeze(1), always.nonzero().squeeze(1)


def folded_lines(rows: torch.Tensor, always: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slope, intercept) the pack folds into Wf: the calibration's, except zero for the always-exact
    neurons, whose exact path then adds their whole output (nothing to cancel: with int8 weights
    a folded line would not cancel exactly, and without one no Wf may be needed at all).

    Example:
        >>> rows = torch.ones(6, 3)
        >>> [t.tolist() for t in folded_lines(rows, torch.tensor([1]))]
        [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
    """
    slope, intercept = rows[0].clone(), rows[1].clone()
    slope[always], intercept[always] = 0.0, 0.0
    return slope, intercept


def fold_ffn(w1_rows: torch.Tensor, b1: torch.Tensor | None, w2_rows: torch.Tensor, b2: torch.Tensor | None,
             slope: torch.Tensor, intercept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``y = W2 (a * (W1 x + b1) + c) + b2`` into ``Wf x + bf``, computed in float32 (float64
    for float64 weights); ``Wf`` in the weights' dtype, ``bf`` in the compute dtype.

    Example:
        >>> w1, w2 = torch.randn(6, 4), torch.randn(6, 3)   # neuron-major
        >>> a, c = torch.rand(6), torch.rand(6)
        >>> wf, bf = fold_ffn(w1, None, w2, None, a, c)
        >>> x = torch.randn(4)
        >>> torch.allclose(wf @ x + bf, w2.t() @ (a * (w1 @ x) + c), atol=1e-5)
        True
    """
    compute = compute_dtype(w1_rows.dtype)
    w1, w2 = w1_rows.to(compute), w2_rows.to(compute)
    a, c = slope.to(compute), intercept.to(compute)
    weight = w2.t() @ (a[:, None] * w1)
    shift = a * b1.to(compute) + c if b1 is not None else c
    bias = w2.t() @ shift
    if b2 is not None:
        bias = bias + b2.to(compute)
    return weight.to(w1_rows.dtype), bias


def pack_layout(kind: str, activation: str, dtype: torch.dtype, d_in: int, d_out: int, m: int, params: torch.Tensor,
                guard: str, group_size: int, fold_term: torch.Tensor | None = None,
                bundles: str = "dense", weights_encoding: str = "dense") -> Layout:
    """The layout ``build_pack`` gives these calibration rows, without building anything (reports).

    Example:
        >>> pack_layout("gated", "silu", torch.bfloat16, 576, 576, 1536, guard_all_params(1536), "all", 64).k_always
        1536
    """
    rows, predictor = split_params(params, m)
    guarded, always = neuron_classes(params, guard, m)
    slope, intercept = folded_lines(rows, always)
    has_wf = bool((intercept != 0).any() or (ffn_kind(kind).folds_slope and (slope != 0).any()))
    has_wf = has_wf or (fold_term is not None and guard != "all")
    encoding = guard if guarded.numel() else "none"
    rank = predictor.shape[0] if encoding == "svd" and predictor is not None else 0
    return Layout(kind, activation, dtype, d_in, d_out, m, guarded.numel(), always.numel(), encoding, group_size,
                  rank, has_wf, *_encodings(bundles, weights_encoding, guard, guarded.numel()))


def _encodings(bundles: str, weights_encoding: str, guard: str, k_guard: int) -> tuple[str, str]:
    """(bundles, weights) of a pack: quantized weights hold every bundle in their encoding (int8
    weights ask for ``bundles="int8"``; int4 weights accept "int8" as the request for quantized
    bundles and store them int4)."""
    if weights_encoding not in WEIGHT_ENCODINGS:
        raise ValueError(f"weights must be one of {WEIGHT_ENCODINGS}, got {weights_encoding!r}")
    if weights_encoding in QUANTIZED_WEIGHTS:
        if bundles not in ("int8", weights_encoding):
            raise ValueError(f"a quantized pack (weights {weights_encoding!r}) holds every bundle quantized: bundles "
                             f"must be 'int8', got {bundles!r}")
        return weights_encoding, weights_encoding  # the "exact" guard then reads the quantized first rows
    return bundle_encoding(bundles, guard, k_guard), "dense"


def build_pack(kind: str, weights: dict[str, torch.Tensor | None], params: torch.Tensor, guard: str,
               activation: str, group_size: int, fold_term: torch.Tensor | None = None,
               bundles: str = "dense", weights_encoding: str = "dense") -> FFNPack:
    """The pack of one FFN with ``guard`` (one of ``PACK_GUARDS``); the guarded neurons' bundles in
    the model's dtype (``bundles="dense"``: their exact path is exact) or int8 (``"int8"``: a
    quarter of float32's bytes, half of bfloat16's, and a rounding error of at most half a step
    per weight). ``weights_encoding="int8"`` or ``"int4"`` makes a quantized pack: ``Wf`` and every
    bundle in that encoding, exact against the dense FFN of the quantized weights
    (``quantize.reference_weights``), whose fold ``Wf`` is.

    ``weights`` are neuron-major views: plain ``w1_rows`` (m, d_in), ``b1``, ``w2_rows`` (m, d_out),
    ``b2``; gated ``wg_rows``, ``bg``, ``wu_rows``, ``bu``, ``wd_rows`` (m, d_out), ``bd``.
    ``params``: the calibration rows (module docstring); ``fold_term``: the calibration's
    least-squares term, (d_out, d_in + 1), or None. The model's weights are only read.
    """
    if guard not in PACK_GUARDS:
        raise ValueError(f"guard must be one of {PACK_GUARDS}, got {guard!r}")
    spec = ffn_kind(kind)
    first, out = weights[spec.first_row], weights[spec.out_row]
    m, d_in = first.shape
    d_out = out.shape[1]
    dtype = first.dtype
    compute = compute_dtype(dtype)
    params = params.detach().to(first.device, compute)
    rows, predictor = split_params(params, m)
    guarded, always = (t.to(first.device) for t in neuron_classes(params, guard, m))
    slope, intercept = folded_lines(rows, always)
    bundled = torch.cat([guarded, always])
    bundle_code, weights_code = _encodings(bundles, weights_encoding, guard, guarded.numel())
    reference = reference_weights(kind, weights, weights_code)  # what the pack is exact against
    with torch.no_grad():
        wf, bf = _fold(kind, reference, slope, intercept)
        if fold_term is not None and guard != "all":
            term = fold_term.to(first.device, compute)
            wf = term[:, :-1] if wf is None else wf.to(compute) + term[:, :-1]
            wf, bf = wf.to(reference[spec.first_row].dtype), bf + term[:, -1]
    encoding = "none" if not guarded.numel() else guard
    if guard == "svd" and guarded.numel() and predictor is None:
        raise ValueError("guard 'svd' needs the factors calibration stores in the profile: "
                         "calibrate with guard='svd' and a budget")
    rank = predictor.shape[0] if encoding == "svd" else 0
    layout = Layout(kind, activation, dtype, d_in, d_out, m, guarded.numel(), always.numel(), encoding,
                    group_size, rank, wf is not None, bundle_code, weights_code)

    row = bundle_row(kind, d_in, d_out)
    packed = first.new_zeros(layout.n_weights)
    if wf is not None and not layout.quant_wf:
        packed[:d_out * d_in] = wf.reshape(-1)
    quant_neurons, dense_neurons = bundled[:layout.k_quant_bundles], bundled[layout.k_quant_bundles:]
    packed[layout.off_bundles:].view(-1, layout.stride)[:, :row] = _bundles(kind, weights, dense_neurons)

    floats = torch.zeros(layout.n_floats, dtype=compute, device=first.device)
    floats[:d_out] = bf
    first_bias = weights[spec.first_bias]
    b_first = first_bias.to(compute) if first_bias is not None else torch.zeros(m, dtype=compute, device=first.device)
    bands = torch.stack([rows[4][guarded] - b_first[guarded], rows[5][guarded] - b_first[guarded]], dim=1)
    floats[layout.off_bands:layout.off_neuron] = bands.reshape(-1)
    floats[layout.off_neuron:layout.off_p] = _neuron_floats(kind, weights, slope, intercept, b_first, bundled).reshape(-1)
    guard_bytes = torch.zeros(layout.n_guard, dtype=torch.uint8)
    if encoding in LOW_BIT_ENCODINGS:
        codes, scales = quantize(reference[spec.first_row].index_select(0, guarded), encoding, group_size)
        guard_bytes[:codes.numel()] = codes.reshape(-1)
        guard_bytes[layout.off_gscales:layout.end_gscales] = scales.reshape(-1)
    elif encoding == "svd":
        q = predictor[:, :m].index_select(1, guarded).t().float().contiguous()
        guard_bytes[:q.numel() * 4] = q.cpu().view(-1).view(torch.uint8)
        floats[layout.off_p:layout.off_qscales] = predictor[:, m:].reshape(-1).to(compute)
    out_scales = output_channel_scales(weights[spec.out_row]) if layout.weights == "int8" else None
    if out_scales is not None:
        floats[layout.off_oscales:] = out_scales.to(compute)
    if layout.k_quant_bundles:
        qbundles = guard_bytes[layout.off_qbundles:layout.off_qwf].view(-1, layout.qstride)
        if layout.bundles == "int4":
            data = int4_bundles(kind, weights, quant_neurons).cpu()
            qbundles[:, :data.shape[1]] = data
        else:  # int8 weights: output columns against the reference's per-channel scales
            codes, scales = int8_bundles(kind, weights, quant_neurons, out_scales)
            qbundles[:, :row] = codes.cpu().view(torch.uint8)
            floats[layout.off_qscales:layout.off_wfscales] = scales.reshape(-1).to(compute)
    if layout.quant_wf and layout.weights == "int4":
        guard_bytes[layout.off_qwf:] = int4_rows(wf).reshape(-1)
    elif layout.quant_wf:
        codes, scales = quantize_rows(wf)
        guard_bytes[layout.off_qwf:] = codes.cpu().reshape(-1).view(torch.uint8)
        floats[layout.off_wfscales:layout.off_oscales] = scales.to(compute)
    meta = layout.meta()  # on the CPU whatever the device: the op reads it without a device sync
    pack = FFNPack(packed, guard_bytes.to(first.device), floats, meta, activation, bundled.cpu(), layout)
    validate_pack(*pack.tensors(), pack.neurons, activation, where="the pack built")  # e.g. non-finite weights
    return pack


def _fold(kind: str, w: dict, slope: torch.Tensor, intercept: torch.Tensor):
    """(Wf or None, bf): every neuron's line folded; Wf is None when every line is zero."""
    lines = ffn_kind(kind).fold_lines(w, slope, intercept)
    if bool((lines[4] != 0).any() or (lines[5] != 0).any()):
        return fold_ffn(*lines)
    b_out = lines[3]
    compute = slope.dtype
    d_out = lines[2].shape[1]
    bias = b_out.to(compute) if b_out is not None else torch.zeros(d_out, dtype=compute, device=slope.device)
    return None, bias


def _bundles(kind: str, w: dict, idx: torch.Tensor) -> torch.Tensor:
    """(k, row) rows ``[first | up | out]`` of the neurons ``idx``."""
    return torch.cat([w[n].detach().index_select(0, idx) for n in ffn_kind(kind).rows], dim=1)


def _neuron_floats(kind: str, w: dict, slope, intercept, b_first, idx) -> torch.Tensor:
    """(k, 4): first bias, up bias, slope, intercept of the bundled neurons."""
    spec, zeros = ffn_kind(kind), torch.zeros_like(slope)
    up_bias = w[spec.up_bias] if spec.up_bias is not None else None
    b_up = up_bias.to(slope.dtype) if up_bias is not None else zeros
    cols = [b_first, b_up, slope if spec.folds_slope else zeros, intercept]
    assert len(cols) == NEURON_FLOATS
    return torch.stack([c.index_select(0, idx) for c in cols], dim=1)


def guard_all_params(m: int) -> torch.Tensor:
    """Calibration rows that fold nothing and flag every neuron: the pack then is the dense FFN.

    Example:
        >>> guard_all_params(4).shape
        torch.Size([6, 4])
    """
    rows = torch.zeros(6, m)
    rows[2], rows[3], rows[4], rows[5] = float("inf"), float("-inf"), float("inf"), float("-inf")
    return rows


def dense_reference(kind: str, weights: dict, activation_fn, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN on neuron-major weights (tests and benchmarks compare against it).

    Example:
        >>> w = {"w1_rows": torch.randn(16, 8), "b1": None, "w2_rows": torch.randn(16, 8), "b2": None}
        >>> dense_reference("plain", w, torch.relu, torch.randn(2, 8)).shape
        torch.Size([2, 8])
    """
    return ffn_kind(kind).dense(weights, activation_fn, x)
