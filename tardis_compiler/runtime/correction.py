"""Flagged-neuron correction primitives: the exact path for the neurons the guard flags.

For flagged neurons ``idx`` (k of m) the correction of a folded FFN is::

    z_k   = gather_rows_matmul(x, W1_nm, idx) + b1[idx]        # (T, k)
    delta = act(z_k) - a[idx] * z_k - c[idx]                  # caller, in torch
    y    += scatter_rows_matmul(delta, W2_nm, idx)            # (T, d_out)

where ``W1_nm``/``W2_nm`` are *neuron-major* (m, n) views of the weights: ``W1`` itself and
``W2.T`` for nn.Linear, the other way round for GPT-2's Conv1D. A transposed view is passed as-is.

Dispatch: CUDA tensors with triton importable go to :mod:`.triton_kernels` (which read ``w``
through its strides, no copy); everything else takes the fastest CPU torch formulation measured by
``benchmarks/correction_cpu.py`` (the thresholds below cite it):

* rows layout (each neuron's row contiguous), gather: ``index_select`` the k rows, one GEMM.
* rows layout, scatter: ``embedding_bag(per_sample_weights=delta)`` for T <= 4 (sums the k rows
  without copying them), else ``index_select`` + GEMM.
* cols layout (a transposed view): every formulation touches nearly every cache line of the
  whole matrix, so this layout is much slower: on a 2048x8192 layer with a cold cache, the best
  cols formulation takes ~8-18x the rows time at k/m = 5%, ~3-9x at 15%, ~1-5x at 30% (1-5x on
  MiniLM's 384x1536). The dense GEMM wins at decode (and for 16-bit weights when many neurons
  are flagged); otherwise the k columns are copied out of the contiguous parent and multiplied.
  A caller that runs the correction often should cache a contiguous neuron-major copy
  (``w.contiguous()``, m*n extra elements) and pass that instead.

All paths accumulate in float32 (torch's CPU GEMMs and embedding_bag accumulate bf16/fp16 in
float32, which the tests check; the Triton kernels do so explicitly) and return the input dtype.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gather_rows_matmul", "scatter_rows_matmul"]

# Thresholds below come from benchmarks/correction_cpu.py (results/correction_cpu.json): 2-core
# AVX-512 (with AVX512-BF16) VM, torch 2.13, one thread, k/m in {0.05, 0.15, 0.3}, T in {1, 4, 16},
# cold and warm cache. They pick the fastest formulation where it wins by a clear margin; where
# candidates were within noise of each other they keep the simpler one.

# Rows layout, scatter: embedding_bag re-reads the k rows once per token, index_select + GEMM
# copies them once and reuses them, so embedding_bag wins at decode and loses by T=16.
_EMBEDDING_BAG_MAX_TOKENS = 4

# Cols layout: a dense GEMM reads the whole matrix, but streams it; a column gather touches
# nearly every cache line anyway once k/m is more than a few percent, and loads them scattered.
# fp32: dense wins at T=1 (its flops grow with m and T, so only there).
_COLS_FP32_DENSE_MIN_FRAC = 0.05  # at T == 1
# 16-bit: the GEMM in F.linear's weight layout (the scatter side's dense form) is cheap here,
# the other layout (the gather side's) less so, hence a lower threshold for scatter.
_COLS_16BIT_DENSE_MIN_FRAC = 0.2  # both sides, T <= _COLS_16BIT_DENSE_MAX_TOKENS
_COLS_16BIT_DENSE_MAX_TOKENS = 16
_COLS_16BIT_SCATTER_DENSE_MIN_FRAC = 0.1  # scatter side only, and only for few tokens:
_COLS_16BIT_SCATTER_DENSE_MAX_TOKENS = 4


@functools.cache
def _triton() -> ModuleType | None:
    """The Triton kernel module, imported on first CUDA use only.

    Lazy on purpose: importing it decorates the kernels, which fixes whether TRITON_INTERPRET
    applies, and costs an import of triton that CPU users never need.
    """
    from . import triton_kernels

    return triton_kernels if triton_kernels.triton_available() else None


def _check(a: Tensor, w: Tensor, idx: Tensor, a_name: str, a_cols: int) -> None:
    if a.dim() != 2 or w.dim() != 2 or idx.dim() != 1:
        raise ValueError(f"expected 2-D {a_name}, 2-D w and 1-D idx; got shapes {tuple(a.shape)}, "
                         f"{tuple(w.shape)}, {tuple(idx.shape)}")
    if a.shape[1] != a_cols:
        raise ValueError(f"{a_name} has {a.shape[1]} columns, expected {a_cols}")
    if a.dtype != w.dtype:
        raise ValueError(f"{a_name} is {a.dtype} but w is {w.dtype}; cast one of them")


def _rows_contiguous(w: Tensor) -> bool:
    """True when each neuron's row is contiguous (nn.Linear W1, Conv1D W2, row slices of them)."""
    return w.stride(1) == 1 or w.shape[1] == 1


def _cols_strategy(w: Tensor, T: int, k: int, side: str) -> str:
    """CPU formulation for a neuron-major view whose rows are strided (column-major).

    "dense": the full GEMM against all m neurons, then only the k flagged ones are used;
    "index_select" / "gather": copy the k columns of the contiguous parent ``w.T`` with
    ``index_select(1)`` (faster for fp32) or ``gather`` with a stride-0 index (faster for 16-bit),
    then one GEMM.
    """
    frac = k / w.shape[0]
    if w.dtype == torch.float32:
        return "dense" if T == 1 and frac >= _COLS_FP32_DENSE_MIN_FRAC else "index_select"
    if T <= _COLS_16BIT_DENSE_MAX_TOKENS and frac >= _COLS_16BIT_DENSE_MIN_FRAC:
        return "dense"
    if (side == "scatter" and T <= _COLS_16BIT_SCATTER_DENSE_MAX_TOKENS
            and frac >= _COLS_16BIT_SCATTER_DENSE_MIN_FRAC):
        return "dense"
    return "gather"


def _select_cols(w: Tensor, idx: Tensor, how: str) -> Tensor:
    """(n, k) contiguous copy of ``w[idx].T``, read through the parent (n, m) matrix ``w.T``."""
    parent = w.T
    if how == "gather":
        return parent.gather(1, idx.expand(parent.shape[0], idx.numel()))
    return parent.index_select(1, idx)


def gather_rows_matmul(x: Tensor, w: Tensor, idx: Tensor) -> Tensor:
    """``x @ w[idx].T``: pre-activations of the flagged neurons, float32 accumulation.

    Args:
        x: (T, n) tokens.
        w: (m, n) neuron-major weight view, any strides (e.g. ``linear.weight`` or
           ``conv1d.weight.T``); same dtype and device as ``x``.
        idx: (k,) int64 neuron ids, duplicate-free; k may be 0.

    Returns:
        (T, k) in ``x.dtype``.

    >>> x, w1 = torch.randn(2, 8), torch.randn(32, 8)     # nn.Linear(8, 32).weight layout
    >>> idx = torch.tensor([3, 17, 30])
    >>> torch.allclose(gather_rows_matmul(x, w1, idx), x @ w1[idx].T, atol=1e-5)
    True
    >>> gather_rows_matmul(x, w1, idx[:0]).shape
    torch.Size([2, 0])
    """
    _check(x, w, idx, "x", w.shape[1])
    if idx.numel() == 0 or x.shape[0] == 0:
        return x.new_zeros(x.shape[0], idx.numel())
    if x.is_cuda and _triton() is not None:
        return _triton().gather_rows_matmul_triton(x, w, idx)
    idx = idx.long()  # gather / index_copy_ want int64
    if _rows_contiguous(w):
        return F.linear(x, w.index_select(0, idx))
    how = _cols_strategy(w, x.shape[0], idx.numel(), "gather")
    if how == "dense":
        return F.linear(x, w).index_select(1, idx)
    return x @ _select_cols(w, idx, how)


def scatter_rows_matmul(delta: Tensor, w: Tensor, idx: Tensor) -> Tensor:
    """``delta @ w[idx]``: the flagged neurons' contribution to the output, float32 accumulation.

    Args:
        delta: (T, k) per-token correction of each flagged neuron.
        w: (m, n) neuron-major weight view, any strides (e.g. ``linear.weight.T`` or
           ``conv1d.weight``); same dtype and device as ``delta``.
        idx: (k,) int64 neuron ids, duplicate-free; k may be 0.

    Returns:
        (T, n) in ``delta.dtype``.

    >>> w2 = torch.randn(8, 32)                            # nn.Linear(32, 8).weight layout
    >>> delta, idx = torch.randn(2, 3), torch.tensor([3, 17, 30])
    >>> torch.allclose(scatter_rows_matmul(delta, w2.T, idx), delta @ w2.T[idx], atol=1e-5)
    True
    >>> scatter_rows_matmul(delta[:, :0], w2.T, idx[:0]).abs().sum().item()
    0.0
    """
    _check(delta, w, idx, "delta", idx.numel())
    if idx.numel() == 0 or delta.shape[0] == 0:
        return delta.new_zeros(delta.shape[0], w.shape[1])
    if delta.is_cuda and _triton() is not None:
        return _triton().scatter_rows_matmul_triton(delta, w, idx)
    idx = idx.long()
    T, k = delta.shape
    if _rows_contiguous(w):
        if T <= _EMBEDDING_BAG_MAX_TOKENS:
            # One fused pass: out[t] = sum_j delta[t, j] * w[idx[j]], no (k, n) copy of rows.
            return F.embedding_bag(idx.expand(T, k), w, per_sample_weights=delta, mode="sum")
        return delta @ w.index_select(0, idx)
    how = _cols_strategy(w, T, k, "scatter")
    if how == "dense":
        # Zero coefficients for unflagged neurons: exact (0 * w adds nothing for finite w).
        full = delta.new_zeros(T, w.shape[0]).index_copy_(1, idx, delta)
        return full @ w
    return F.linear(delta, _select_cols(w, idx, how))
