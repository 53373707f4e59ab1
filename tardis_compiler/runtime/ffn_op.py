"""Lowering: the ``tardis::ffn`` op, the one runtime behind both front doors (the backend's graph
rewrite and, on compressed modules, the module swap).

    y = torch.ops.tardis.ffn(x, weights, guard, floats, meta, d_out, activation, name)

The four tensors are an ``FFNPack`` (``runtime/pack.py``); the op is a pure function of them.
On CPU, calls of at most ``FUSED_MAX_TOKENS`` tokens (decode) run the fused kernel: one call into
compiled code, no intermediate tensor but the output. Longer calls (prefill, batches), other devices,
dtypes other than float32/bfloat16, activations the kernel does not know, and machines where the
kernel cannot be built run ``torch_path.ffn_torch``: the same function in batched torch ops.

Defined with ``torch.library.Library`` rather than the ``custom_op`` decorator: it dispatches in
about half the time (research/cpu_kernels.md), and this op's whole budget is a few microseconds.
Inductor keeps it opaque (an extern call); the fake kernel gives the output's shape.
"""
from __future__ import annotations

import torch

from ..activations import is_builtin
from .cpu.kernel import MAX_TOKENS, kernel
from .layout import DTYPES, FIELD, Layout
from .stats import active_stats
from .torch_path import ffn_torch

#: Calls of at most this many tokens run the fused kernel on CPU (measured by
#: ``benchmarks/ffn_decode.py --prefill``: above it the batched GEMMs of the torch path win).
FUSED_MAX_TOKENS = 64
assert FUSED_MAX_TOKENS <= MAX_TOKENS

_LIB = torch.library.Library("tardis", "DEF")
_LIB.define("ffn(Tensor x, Tensor weights, Tensor guard, Tensor floats, Tensor meta, int d_out, str activation, "
            "str name) -> Tensor")


def _ffn_cpu(x: torch.Tensor, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor,
             meta: torch.Tensor, d_out: int, activation: str, name: str) -> torch.Tensor:
    # The decode path: every line here is paid per FFN per token (benchmarks/ffn_decode.py times it).
    fused = kernel()
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (fused is None or not 0 < tokens <= FUSED_MAX_TOKENS or x.dtype not in DTYPES or x.dtype != weights.dtype
            or not is_builtin(activation)):
        return _ffn_any(x, weights, guard, floats, meta, d_out, activation, name)
    if not x.is_contiguous():
        x = x.contiguous()
    y = x.new_empty((*x.shape[:-1], d_out))
    stats = active_stats()
    counters = torch.zeros(3, dtype=torch.int64) if stats is not None else None
    fused.ffn(x, y, tokens, weights, guard, floats, meta, counters)
    if stats is not None:
        stats.record(name, tokens, int(meta[FIELD["M"]]), int(counters[0]), int(counters[1]), dense=False)
    return y


def _ffn_any(x: torch.Tensor, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor,
             meta: torch.Tensor, d_out: int, activation: str, name: str) -> torch.Tensor:
    layout = Layout.from_meta(meta.cpu(), activation, weights.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    if x.dtype != weights.dtype:
        raise ValueError(f"tardis.ffn: x is {x.dtype} but the pack is {weights.dtype}; "
                         "call the model in the dtype it was compressed in")
    y, flags = ffn_torch(x2, weights, guard, floats, meta, layout)
    stats = active_stats()
    if stats is not None:
        flagged = int(flags.sum()) if flags is not None else 0
        corrected = int(flags.any(dim=0).sum()) if flags is not None else 0
        stats.record(name, x2.shape[0], layout.m, flagged, corrected, dense=x2.shape[0] > FUSED_MAX_TOKENS)
    return y.view(*x.shape[:-1], d_out)


_LIB.impl("ffn", _ffn_cpu, "CPU")
_LIB.impl("ffn", _ffn_any, "CompositeExplicitAutograd")


@torch.library.register_fake("tardis::ffn", lib=_LIB)
def _ffn_fake(x, weights, guard, floats, meta, d_out, activation, name):
    return x.new_empty((*x.shape[:-1], d_out))


def ffn(x: torch.Tensor, pack, name: str = "") -> torch.Tensor:
    """Run ``pack`` (an ``FFNPack``) on ``x`` (..., d_in) through the op.

    Example:
        >>> from tardis_compiler.runtime.pack import build_pack, guard_all_params, dense_reference
        >>> w = {"w1_rows": torch.randn(16, 8), "b1": None, "w2_rows": torch.randn(16, 8), "b2": None}
        >>> pack = build_pack("plain", w, guard_all_params(16), "all", "relu", 64)
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(ffn(x, pack), dense_reference("plain", w, torch.relu, x), atol=1e-5)
        True
    """
    return torch.ops.tardis.ffn.default(x, *pack.tensors(), pack.layout.d_out, pack.activation, name)

