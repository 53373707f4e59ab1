"""Split a pack by neurons across tensor-parallel ranks.

Under tensor parallelism an FFN's output is the sum of every rank's partial output (the down
projection's all-reduce). A pack splits the same way, with no other communication:

- each rank keeps about 1/world of the guarded neurons and 1/world of the always-exact ones (their
  guard codes, bands, bundles and per-neuron floats); a neuron's flag and correction depend on
  that neuron alone, so the ranks' corrections add up to the whole pack's;
- the folded matrix ``Wf`` (d_out x d_in) is split by input columns: rank r computes
  ``Wf[:, cols_r] @ x[cols_r]``, a plain matmul beside the op (its pack has no Wf), and reads
  1/world of Wf;
- the folded bias goes to rank 0 alone.

So each rank holds and reads about 1/world of the pack's bytes, and the sum over ranks equals the
unsplit pack's output up to float32 rounding (tests/runtime/test_shard.py). The svd guard's shared
projection ``P`` is the one part every rank keeps whole.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .ffn_op import ffn as run_ffn
from .layout import NEURON_FLOATS, Layout, guard_codes_bytes, guard_scale_bytes
from .pack import FFNPack
from .torch_path import folded_matrix
from .validate import validate_pack


@dataclasses.dataclass
class PackShard:
    """One rank's part of a pack: ``pack`` (its neurons, no Wf) and its columns of Wf.

    ``wf`` is (d_out, len(cols)) in the model's dtype, or int8 codes with ``wf_scales`` (d_out,)
    float32 (a quantized pack; int4: float32 values with unit scales); None when the pack has no Wf. ``__call__(x)`` is the rank's
    partial output, which the ranks' all-reduce sums.
    """

    pack: FFNPack
    cols: slice
    wf: torch.Tensor | None = None
    wf_scales: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, name: str = "") -> torch.Tensor:
        y = run_ffn(x, self.pack, name)
        return y if self.wf is None else y + wf_columns_output(x, self.cols, self.wf, self.wf_scales)

    def resident_bytes(self) -> int:
        """Bytes this shard holds: its pack's buffers (as ``Layout.resident_bytes``) and its Wf columns."""
        held = self.pack.layout.resident_bytes()
        for t in (self.wf, self.wf_scales):
            held += t.numel() * t.element_size() if t is not None else 0
        return held


def wf_columns_output(x: torch.Tensor, cols: slice, wf: torch.Tensor, wf_scales: torch.Tensor | None) -> torch.Tensor:
    """A rank's share of ``Wf x``: ``Wf[:, cols] @ x[cols]`` (int8 codes times per-row scales, in
    float32 as the fused kernel computes a quantized Wf), in x's dtype."""
    part = x[..., cols]
    if wf_scales is None:
        return F.linear(part, wf)
    return (F.linear(part.float(), wf.float()) * wf_scales).to(x.dtype)


def shard_pack(pack: FFNPack, rank: int, world: int) -> PackShard:
    """Rank ``rank``'s part of ``pack`` among ``world`` ranks (see the module docstring); the
    pack's tensors are only read.

    Example:
        >>> from tardis_compiler.runtime.pack import build_pack, guard_all_params
        >>> w = {"w1_rows": torch.randn(16, 8), "b1": None, "w2_rows": torch.randn(16, 8), "b2": None}
        >>> pack = build_pack("plain", w, guard_all_params(16), "all", "relu", 64)
        >>> x = torch.randn(3, 8)
        >>> total = sum(shard_pack(pack, r, 2)(x) for r in range(2))
        >>> torch.allclose(total, run_ffn(x, pack), atol=1e-5)
        True
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be a positive integer, got {world!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an integer in [0, {world}), got {rank!r}")
    lay = pack.layout
    guarded = _chunk(0, lay.k_guard, rank, world)
    always = _chunk(lay.k_guard, lay.k_bundles, rank, world)
    keep = torch.cat([guarded, always])
    k_guard, k_always = guarded.numel(), always.numel()
    bundles = lay.bundles if k_guard or lay.weights != "dense" else "dense"  # int8 bundles are the guarded ones'
    part = Layout(lay.kind, lay.activation, lay.dtype, lay.d_in, lay.d_out, lay.m, k_guard, k_always,
                  lay.guard if k_guard else "none", lay.group, lay.rank if k_guard else 0, False, bundles, lay.weights)
    weights = pack.weights.new_zeros(part.n_weights)
    guard = torch.zeros(part.n_guard, dtype=torch.uint8, device=pack.guard.device)
    floats = pack.floats.new_zeros(part.n_floats)
    if rank == 0:
        floats[:lay.d_out] = pack.floats[:lay.d_out]  # the folded bias, once
    _copy_guard(pack, lay, part, guarded, guard, floats)
    _copy_bundles(pack, lay, part, keep, weights, guard, floats)
    floats[part.off_oscales:] = pack.floats[lay.off_oscales:]  # int8 weights' output scales: every rank's
    nf_old = pack.floats[lay.off_neuron:lay.off_p].view(lay.k_bundles, NEURON_FLOATS)
    floats[part.off_neuron:part.off_p] = nf_old.index_select(0, keep.to(nf_old.device)).reshape(-1)
    neurons = pack.neurons.index_select(0, keep.to(pack.neurons.device))
    where = f"shard {rank}/{world}"
    validate_pack(weights, guard, floats, part.meta(), neurons, pack.activation, expected=part, where=where)
    shard = PackShard(FFNPack(weights, guard, floats, part.meta(), pack.activation, neurons, part),
                      _chunk_slice(lay.d_in, rank, world))
    if lay.has_wf:
        shard.wf, shard.wf_scales = _wf_columns(pack, lay, shard.cols)
    return shard


def _chunk(start: int, end: int, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous share of the indices [start, end) (sizes differ by at most one)."""
    n = end - start
    lo, hi = start + n * rank // world, start + n * (rank + 1) // world
    return torch.arange(lo, hi, dtype=torch.int64)


def _chunk_slice(n: int, rank: int, world: int) -> slice:
    return slice(n * rank // world, n * (rank + 1) // world)


def _copy_guard(pack: FFNPack, lay: Layout, part: Layout, guarded: torch.Tensor, guard: torch.Tensor,
                floats: torch.Tensor) -> None:
    """The kept guarded neurons' codes, scales and bands; svd's shared P whole."""
    if not guarded.numel():
        return
    codes = guard_codes_bytes(lay.guard, lay.d_in, lay.group, lay.rank)
    scales = guard_scale_bytes(lay.guard, lay.d_in, lay.group)
    idx = guarded.to(pack.guard.device)
    if codes:
        rows = pack.guard[:lay.k_guard * codes].view(lay.k_guard, codes)
        guard[:part.k_guard * codes] = rows.index_select(0, idx).reshape(-1)
    if scales:
        rows = pack.guard[lay.off_gscales:lay.end_gscales].view(lay.k_guard, scales)
        guard[part.off_gscales:part.end_gscales] = rows.index_select(0, idx).reshape(-1)
    bands = pack.floats[lay.off_bands:lay.off_neuron].view(lay.k_guard, 2)
    floats[part.off_bands:part.off_neuron] = bands.index_select(0, guarded.to(bands.device)).reshape(-1)
    floats[part.off_p:part.off_qscales] = pack.floats[lay.off_p:lay.off_qscales]  # svd's P (empty otherwise)


def _copy_bundles(pack: FFNPack, lay: Layout, part: Layout, keep: torch.Tensor, weights: torch.Tensor,
                  guard: torch.Tensor, floats: torch.Tensor) -> None:
    """The kept bundles, int8 (in ``guard``, with their scales) or dense (in ``weights``), in order."""
    for new, old in enumerate(keep.tolist()):
        if old < lay.k_quant_bundles:
            assert new < part.k_quant_bundles, "a quantized bundle keeps its encoding"
            src = lay.off_qbundles + old * lay.qstride
            dst = part.off_qbundles + new * part.qstride
            guard[dst:dst + lay.qstride] = pack.guard[src:src + lay.qstride]
            q = lay.qscales  # float scales per bundle (int4 bundles carry theirs in their bytes)
            floats[part.off_qscales + q * new:part.off_qscales + q * (new + 1)] = \
                pack.floats[lay.off_qscales + q * old:lay.off_qscales + q * (old + 1)]
        else:
            src = lay.off_bundles + (old - lay.k_quant_bundles) * lay.stride
            dst = part.off_bundles + (new - part.k_quant_bundles) * part.stride
            weights[dst:dst + lay.stride] = pack.weights[src:src + lay.stride]


def _wf_columns(pack: FFNPack, lay: Layout, cols: slice) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Wf[:, cols] (contiguous), and its per-row scales for a quantized pack. An int4 Wf's columns
    are held dequantized (float32, unit scales): its groups do not split at arbitrary columns."""
    if lay.quant_wf and lay.weights == "int4":
        wf = folded_matrix(lay, pack.weights, pack.guard, pack.floats)
        return wf[:, cols].contiguous(), torch.ones(lay.d_out, device=wf.device)
    if lay.quant_wf:
        codes = pack.guard[lay.off_qwf:lay.n_guard].view(torch.int8).view(lay.d_out, lay.d_in)
        return codes[:, cols].contiguous(), pack.floats[lay.off_wfscales:lay.off_oscales].float().clone()
    wf = pack.weights[:lay.d_out * lay.d_in].view(lay.d_out, lay.d_in)
    return wf[:, cols].contiguous(), None
