"""Lowering: the ``tardis::ffn`` op, the one runtime behind both front doors (the backend's graph
rewrite and, on compressed modules, the module swap).

    y = torch.ops.tardis.ffn(x, weights, guard, floats, meta, d_out, activation, name, dense_above, dense)

The four tensors are an ``FFNPack`` (``runtime/pack.py``); the op is a pure function of them.
On CPU, calls of at most ``FUSED_MAX_TOKENS`` tokens (decode) run the fused kernel: one call into
compiled code, no intermediate tensor but the output. Longer calls (prefill, batches), other devices,
dtypes other than float32/bfloat16, activations the kernel does not know, and machines where the
kernel cannot be built run ``torch_path.ffn_torch``: the same function in batched torch ops.

Calls of more than ``dense_above`` tokens (prefill, batches: where the dense FFN is measured faster
than the pack's guarded paths, ``DENSE_ABOVE``) run the FFN as densely as the caller holds it;
``dense_above=-1`` never does. ``dense`` optionally holds the FFN's own weights in ``nn.Linear``
layout (plain: first weight and bias, second weight and bias; gated: gate, up, down, each weight
and bias; a missing bias is None): those calls then run the dense FFN. The backend's graphs pass
them (the weights are graph inputs anyway); a pack alone (compressed modules) has none, and those
calls run every bundled neuron exactly, with no guard: bundles in the model's dtype through torch's
GEMMs over them (``torch_path.ffn_exact``, about the dense FFN's cost), int8 bundles through the
fused kernel's exact_all mode (each bundle widened once for all tokens) or, where the kernel
cannot take the call (more than its 64 tokens, another device), ``ffn_exact`` after dequantizing
them (the guarded torch path dequantizes them too, and then also runs the guard). Inside ``every_token_through_packs()`` every call takes
the guarded paths: what measuring the approximation (perplexity of full windows) needs.

Defined with ``torch.library.Library`` rather than the ``custom_op`` decorator: it dispatches in
about half the time (research/cpu_kernels.md), and this op's whole budget is a few microseconds.
Inductor keeps it opaque (an extern call); the fake kernel gives the output's shape.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

import torch.nn.functional as F

from ..activations import get_activation_rule, is_builtin
from .cpu.kernel import MAX_TOKENS, kernel
from .layout import DTYPES, FIELD, KERNEL_ACTIVATIONS, Layout
from .stats import active_stats
from .torch_path import ffn_exact, ffn_torch

#: Calls of at most this many tokens run the fused kernel on CPU (measured by
#: ``benchmarks/ffn_decode.py --prefill``: above it the batched GEMMs of the torch path win).
FUSED_MAX_TOKENS = 64
assert FUSED_MAX_TOKENS <= MAX_TOKENS

#: Above this many tokens per call the dense FFN is faster than the pack, per dtype and compute threads
#: (SmolLM2 at budget 0.5: 2 threads from ``benchmarks/ffn_decode.py --prefill``, 1 thread from
#: ``benchmarks/vllm_crossover.py`` in vLLM's engine process, which computes on one thread of 2 cores).
#: More threads than measured take the largest count measured, other dtypes the float32 figures.
DENSE_ABOVE = {torch.bfloat16: {1: 1, 2: 4}, torch.float32: {1: 4, 2: 16}}

#: The same for a pack alone (no dense weights): above this many tokens every-bundle-exact (torch's
#: GEMMs over model-dtype rows, the kernel's exact_all over int8 rows) beats the guarded kernel for
#: both kinds of rows (``benchmarks/ffn_decode.py --prefill --threads 1|2``, SmolLM2 at budget 0.5,
#: 2026-12-07: docs/RESULTS.md "Calls above dense_above without dense weights").
EXACT_ABOVE = {torch.bfloat16: {1: 4, 2: 4}, torch.float32: {1: 2, 2: 8}}

_LIB = torch.library.Library("tardis", "DEF")
_LIB.define("ffn(Tensor x, Tensor weights, Tensor guard, Tensor floats, Tensor meta, int d_out, str activation, "
            "str name, int dense_above, Tensor?[] dense) -> Tensor")


@torch.compiler.assume_constant_result  # traced modules (dynamo) take the count at trace time
def _compute_threads() -> int:
    return torch.get_num_threads()


def dense_above_for(dtype: torch.dtype, threads: int | None = None, kept_dense: bool = True) -> int:
    """The measured token count above which the dense FFN (``kept_dense``: ``DENSE_ABOVE``), or
    without dense weights every bundle exact (``EXACT_ABOVE``), is faster than the guarded paths, for
    ``threads`` compute threads (None: ``torch.get_num_threads()``, the threads this call would run on).

    Example:
        >>> dense_above_for(torch.bfloat16, 2), dense_above_for(torch.bfloat16, 1), dense_above_for(torch.float64, 8)
        (4, 1, 16)
        >>> dense_above_for(torch.bfloat16, 1, kept_dense=False), dense_above_for(torch.float32, 2, kept_dense=False)
        (4, 8)
    """
    tables = DENSE_ABOVE if kept_dense else EXACT_ABOVE
    table = tables.get(dtype, tables[torch.float32])
    threads = _compute_threads() if threads is None else threads
    measured = min(table)  # the largest count measured that is at most `threads` (a loop: dynamo traces it)
    for count in table:
        if measured < count <= threads:
            measured = count
    return table[measured]


class _Approximate(threading.local):
    """How many ``every_token_through_packs`` blocks this thread is in."""

    def __init__(self) -> None:
        self.depth = 0


_APPROXIMATE = _Approximate()


@contextlib.contextmanager
def every_token_through_packs() -> Iterator[None]:
    """Within this block (this thread), every call of the op takes the pack's guarded paths, however
    many tokens it has: ``dense_above`` is ignored. The approximation is what decode runs; measuring
    it on full windows (perplexity, zero-shot scores) needs this, or a model built with
    ``dense_above=-1``. ``tardis_compiler.eval`` metrics use it.

    Example:
        >>> with every_token_through_packs():
        ...     runs_dense(512, 4)
        False
        >>> runs_dense(512, 4), runs_dense(4, 4), runs_dense(512, -1)
        (True, False, False)
    """
    _APPROXIMATE.depth += 1
    try:
        yield
    finally:
        _APPROXIMATE.depth -= 1


def runs_dense(tokens: int, dense_above: int) -> bool:
    """Whether a call of ``tokens`` tokens leaves the guarded paths (see the module docstring)."""
    return 0 <= dense_above < tokens and not _APPROXIMATE.depth


def _dense_or_exact(x: torch.Tensor, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor,
                    meta: torch.Tensor, activation: str, name: str,
                    dense: list[torch.Tensor | None]) -> torch.Tensor | None:
    """A call above ``dense_above``: the dense FFN from ``dense``, else every bundled neuron exact
    (quantized bundles: the fused kernel's exact_all mode where it takes the call; otherwise torch's
    GEMMs over the bundles, quantized ones dequantized first); None: x is not in the pack's dtype
    (the guarded paths raise the error)."""
    if dense:  # the backend's prefill: no layout to parse
        return _dense_ffn(x, dense, activation, name, int(meta[FIELD["M"]]))
    if x.dtype != weights.dtype:
        return None
    layout = Layout.from_meta(meta.cpu(), activation, weights.dtype)
    tokens = x.shape[:-1].numel()
    fused = kernel()
    if layout.k_quant_bundles and x.device.type == "cpu" and _kernel_runs(fused, x, activation, tokens):
        y = x.new_empty((*x.shape[:-1], layout.d_out))
        fused.ffn(x.contiguous(), y, weights, guard, floats, meta, KERNEL_ACTIVATIONS[activation], exact_all=True)
    else:  # quantized bundles beyond the kernel are dequantized once per call, as the guarded torch path does
        y = ffn_exact(x.reshape(-1, x.shape[-1]), weights, guard, floats, layout).view(*x.shape[:-1], layout.d_out)
    stats = active_stats()
    if stats is not None:
        stats.record(name, tokens, layout.m, 0, 0, dense=True)
    return y


def _kernel_runs(fused, x: torch.Tensor, activation: str, tokens: int) -> bool:
    """Whether the fused kernel (``fused``: None where it cannot be built) takes this call: a dtype,
    activation and size it knows."""
    return (fused is not None and 0 < tokens <= FUSED_MAX_TOKENS and x.dtype in DTYPES and is_builtin(activation)
            and activation in KERNEL_ACTIVATIONS)


def _ffn_cpu(x: torch.Tensor, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor,
             meta: torch.Tensor, d_out: int, activation: str, name: str, dense_above: int,
             dense: list[torch.Tensor | None]) -> torch.Tensor:
    # The decode path: every line here is paid per FFN per token (benchmarks/ffn_decode.py times it).
    fused = kernel()
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if runs_dense(tokens, dense_above):
        y = _dense_or_exact(x, weights, guard, floats, meta, activation, name, dense)
        if y is not None:
            return y
    if x.dtype != weights.dtype or not _kernel_runs(fused, x, activation, tokens):
        return _ffn_any(x, weights, guard, floats, meta, d_out, activation, name, -1, [])
    if not x.is_contiguous():
        x = x.contiguous()
    y = x.new_empty((*x.shape[:-1], d_out))
    stats = active_stats()
    counters = torch.zeros(3, dtype=torch.int64) if stats is not None else None
    fused.ffn(x, y, weights, guard, floats, meta, KERNEL_ACTIVATIONS[activation], counters)
    if stats is not None:
        stats.record(name, tokens, int(meta[FIELD["M"]]), int(counters[0]), int(counters[1]), dense=False)
    return y


def _ffn_any(x: torch.Tensor, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor,
             meta: torch.Tensor, d_out: int, activation: str, name: str, dense_above: int,
             dense: list[torch.Tensor | None]) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if runs_dense(x2.shape[0], dense_above):
        y = _dense_or_exact(x, weights, guard, floats, meta, activation, name, dense)
        if y is not None:
            return y
    layout = Layout.from_meta(meta.cpu(), activation, weights.dtype)
    if x.dtype != weights.dtype:
        raise ValueError(f"tardis.ffn: x is {x.dtype} but the pack is {weights.dtype}; "
                         "call the model in the dtype it was compressed in")
    y, flags = ffn_torch(x2, weights, guard, floats, meta, layout)
    stats = active_stats()
    if stats is not None:
        flagged = int(flags.sum()) if flags is not None else 0
        corrected = int(flags.any(dim=0).sum()) if flags is not None else 0
        stats.record(name, x2.shape[0], layout.m, flagged, corrected, dense=False)
    return y.view(*x.shape[:-1], d_out)


def _dense_ffn(x: torch.Tensor, dense: list[torch.Tensor | None], activation: str, name: str,
               m: int) -> torch.Tensor:
    """The FFN itself, from its own weights (``dense``, see the module docstring)."""
    act = get_activation_rule(activation).fn
    # Weight and bias per linear in its kind's order (runtime/ffn_kind.py): the first input linear
    # is activated, the others (a gated FFN's up) multiply it, the last is the output linear.
    h = act(F.linear(x, dense[0], dense[1]))
    for i in range(2, len(dense) - 2, 2):
        h = h * F.linear(x, dense[i], dense[i + 1])
    y = F.linear(h, dense[-2], dense[-1])
    stats = active_stats()
    if stats is not None:
        stats.record(name, x.numel() // x.shape[-1], m, 0, 0, dense=True)
    return y


_LIB.impl("ffn", _ffn_cpu, "CPU")
_LIB.impl("ffn", _ffn_any, "CompositeExplicitAutograd")


@torch.library.register_fake("tardis::ffn", lib=_LIB)
def _ffn_fake(x, weights, guard, floats, meta, d_out, activation, name, dense_above, dense):
    return x.new_empty((*x.shape[:-1], d_out))


def ffn(x: torch.Tensor, pack, name: str = "", dense_above: int = -1,
        dense: list[torch.Tensor | None] | tuple = ()) -> torch.Tensor:
    """Run ``pack`` (an ``FFNPack``) on ``x`` (..., d_in) through the op; with the FFN's own
    weights in ``dense``, calls of more than ``dense_above`` tokens run them instead.

    Example:
        >>> from tardis_compiler.runtime.pack import build_pack, guard_all_params, dense_reference
        >>> w = {"w1_rows": torch.randn(16, 8), "b1": None, "w2_rows": torch.randn(16, 8), "b2": None}
        >>> pack = build_pack("plain", w, guard_all_params(16), "all", "relu", 64)
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(ffn(x, pack), dense_reference("plain", w, torch.relu, x), atol=1e-5)
        True
    """
    return torch.ops.tardis.ffn.default(x, *pack.tensors(), pack.layout.d_out, pack.activation, name, dense_above,
                                        list(dense))

