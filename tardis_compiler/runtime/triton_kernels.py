"""Triton kernels for the flagged-neuron correction (the GPU path of :mod:`.correction`).

Two primitives over a *neuron-major* weight view ``w`` of shape ``(m, n)`` with arbitrary strides
(a transposed view is passed as-is and read through its strides, never copied):

* :func:`gather_rows_matmul_triton`  ``out[t, j] = sum_c x[t, c] * w[idx[j], c]``      (T, k)
* :func:`scatter_rows_matmul_triton` ``out[t, c] = sum_j delta[t, j] * w[idx[j], c]``  (T, n)

Both tile over (tokens, output columns), loop over the reduction dimension in ``BLOCK_R`` chunks,
mask the ragged edges and accumulate in float32. Optionally the reduction is split over a third
grid axis (``split``): each split writes a float32 partial and torch sums them, which keeps the
result deterministic (no atomics) and gives a decode-size problem enough programs to fill a GPU.

Triton is optional: this module imports without it (``triton_available()`` is then False and the
public functions raise). On a machine without a GPU the kernels run on CPU tensors under
``TRITON_INTERPRET=1``; that variable is read when ``@triton.jit`` decorates the kernels, i.e. when
this module is first imported, so it must be set before that.

The default block sizes are chosen for an H100 by reasoning (memory-bound GEMV at T=1, tensor-core
tiles for T >= 16); they have not been tuned on a GPU. Every block size is a keyword argument.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

try:  # optional dependency: the CPU path of the package must work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

__all__ = [
    "triton_available", "default_blocks", "gather_rows_matmul_triton", "scatter_rows_matmul_triton",
]


def triton_available() -> bool:
    """True when triton imported, i.e. the kernels below exist.

    >>> isinstance(triton_available(), bool)
    True
    """
    return triton is not None


if triton is not None:

    @triton.jit
    def _gather_rows_matmul_kernel(
        x_ptr, w_ptr, idx_ptr, out_ptr,
        T, K, N, r_per_split,
        stride_xt, stride_xn, stride_wm, stride_wn, stride_os, stride_ot, stride_ok,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
        USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        # Program (pid_t, pid_k, pid_s) computes out[s, t-block, k-block] over the reduction
        # slice [pid_s * r_per_split, (pid_s + 1) * r_per_split) of the n input features.
        pid_t = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_t = offs_t < T
        mask_k = offs_k < K
        # int64 row ids (and column offsets below): idx * stride_wm can pass 2**31 on big layers.
        rows = tl.load(idx_ptr + offs_k, mask=mask_k, other=0)
        x_rows = x_ptr + offs_t.to(tl.int64)[:, None] * stride_xt
        w_rows = w_ptr + rows[:, None] * stride_wm
        r_begin = pid_s * r_per_split
        r_end = tl.minimum(r_begin + r_per_split, N)
        acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        for r0 in range(r_begin, r_end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < r_end
            xt = tl.load(x_rows + offs_r[None, :] * stride_xn,
                         mask=mask_t[:, None] & mask_r[None, :], other=0.0)
            wt = tl.load(w_rows + offs_r.to(tl.int64)[None, :] * stride_wn,
                         mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            if USE_DOT:  # tensor cores; needs every tile dim >= 16
                if UPCAST_DOT:
                    xt = xt.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc = tl.dot(xt, tl.trans(wt), acc, input_precision=INPUT_PRECISION)
            else:  # few tokens (decode): a broadcast multiply-reduce, no wasted MMA rows
                acc += tl.sum(xt.to(tl.float32)[:, None, :] * wt.to(tl.float32)[None, :, :], axis=2)
        out = (out_ptr + pid_s * stride_os
               + offs_t[:, None] * stride_ot + offs_k[None, :] * stride_ok)
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_k[None, :])

    @triton.jit
    def _scatter_rows_matmul_kernel(
        d_ptr, w_ptr, idx_ptr, out_ptr,
        T, N, K, r_per_split,
        stride_dt, stride_dk, stride_wm, stride_wn, stride_os, stride_ot, stride_on,
        BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        USE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ):
        # Program (pid_t, pid_n, pid_s) computes out[s, t-block, n-block] over the slice
        # [pid_s * r_per_split, (pid_s + 1) * r_per_split) of the k flagged neurons.
        pid_t = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_t = offs_t < T
        mask_n = offs_n < N
        w_cols = offs_n.to(tl.int64)[None, :] * stride_wn  # 64-bit: n * stride can pass 2**31
        d_rows = d_ptr + offs_t.to(tl.int64)[:, None] * stride_dt
        r_begin = pid_s * r_per_split
        r_end = tl.minimum(r_begin + r_per_split, K)
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for r0 in range(r_begin, r_end, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < r_end
            rows = tl.load(idx_ptr + offs_r, mask=mask_r, other=0)
            dt = tl.load(d_rows + offs_r[None, :] * stride_dk,
                         mask=mask_t[:, None] & mask_r[None, :], other=0.0)
            wt = tl.load(w_ptr + rows[:, None] * stride_wm + w_cols,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0)
            if USE_DOT:
                if UPCAST_DOT:
                    dt = dt.to(tl.float32)
                    wt = wt.to(tl.float32)
                acc = tl.dot(dt, wt, acc, input_precision=INPUT_PRECISION)
            else:
                acc += tl.sum(dt.to(tl.float32)[:, :, None] * wt.to(tl.float32)[None, :, :], axis=1)
        out = (out_ptr + pid_s * stride_os
               + offs_t[:, None] * stride_ot + offs_n[None, :] * stride_on)
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_n[None, :])


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("triton is not installed: pip install 'tardis-compiler[gpu]' "
                           "(triton==3.7.1)")


def default_blocks(side: str, T: int) -> tuple[int, int, int]:
    """Default (BLOCK_T, BLOCK_OUT, BLOCK_R) for ``side`` in {"gather", "scatter"} and T tokens.

    Chosen for an H100 by reasoning, not tuned on one. T=1 (decode) is a memory-bound GEMV:
    BLOCK_T=1 takes the multiply-reduce path and the tiles are wide along each weight row
    (gather: 16 neurons x 256 features; scatter: 16 neurons x 128 output features). BLOCK_T >= 16
    uses tl.dot (tensor cores need every tile dimension >= 16; short T is masked).

    >>> default_blocks("gather", 1), default_blocks("scatter", 4096)
    ((1, 16, 256), (64, 64, 32))
    """
    if T == 1:
        return (1, 16, 256) if side == "gather" else (1, 128, 16)
    block_t = 16 if T <= 16 else 32 if T <= 32 else 64
    if side == "gather":
        return block_t, 64 if block_t == 64 else 32, 64
    return block_t, 64, 32


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 operands: follow torch's own matmul setting (TF32 off by default), so "flag every neuron"
    # reproduces the dense model to fp32 rounding. 16-bit operands ignore this setting.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(programs: int, r_blocks: int, device: torch.device, split: int | None) -> int:
    """How many slices to split the reduction into: enough programs to cover ~2 waves of SMs."""
    if split is None:
        if device.type != "cuda":  # interpreter: more programs only cost time
            return 1
        index = device.index if device.index is not None else torch.cuda.current_device()
        target = 2 * _sm_count(index)
        split = -(-target // max(programs, 1))
    return max(1, min(split, r_blocks))


def _launch(kernel, a: Tensor, w: Tensor, idx: Tensor, T: int, n_out: int, n_red: int,
            block_t: int, block_out: int, block_r: int, split: int | None,
            num_warps: int, num_stages: int) -> Tensor:
    """Shared launch logic: output or float32 partials, grid (T blocks, out blocks, splits)."""
    use_dot = block_t >= 16  # tl.dot needs every tile dimension >= 16
    grid_t = triton.cdiv(T, block_t)
    grid_o = triton.cdiv(n_out, block_out)
    r_blocks = triton.cdiv(n_red, block_r)
    splits = _num_splits(grid_t * grid_o, r_blocks, a.device, split)
    r_per_split = triton.cdiv(r_blocks, splits) * block_r  # block-aligned slices
    splits = triton.cdiv(n_red, r_per_split)  # drop empty trailing slices
    # Two triton 3.7.1 interpreter gaps with bfloat16: its tl.dot multiplies bf16's raw uint16
    # storage (interpreter.create_dot), so upcast the dot operands; and its fp32 -> bf16 cast
    # truncates instead of rounding to nearest even (cast_impl), so store float32 and let torch
    # round. Compiled (GPU) kernels are unaffected.
    interp_bf16 = a.dtype == torch.bfloat16 and not isinstance(kernel, triton.runtime.JITFunction)
    if splits == 1 and not interp_bf16:
        out = torch.empty((T, n_out), dtype=a.dtype, device=a.device)
        stride_os = 0
    else:
        out = torch.empty((splits, T, n_out), dtype=torch.float32, device=a.device)
        stride_os = out.stride(0)
    kernel[(grid_t, grid_o, splits)](
        a, w, idx, out,
        T, n_out, n_red, r_per_split,
        a.stride(0), a.stride(1), w.stride(0), w.stride(1),
        stride_os, out.stride(-2), out.stride(-1),
        block_t, block_out, block_r, use_dot, use_dot and interp_bf16,
        "ieee" if interp_bf16 else _input_precision(a.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out if out.dim() == 2 else out.sum(0).to(a.dtype)


def _check(a: Tensor, w: Tensor, idx: Tensor, a_name: str, a_cols: int) -> Tensor:
    from .correction import _check as check_operands  # one validation for both back ends

    check_operands(a, w, idx, a_name, a_cols)
    # int64 ids keep idx * stride in 64-bit inside the kernel.
    return idx.to(device=a.device, dtype=torch.int64).contiguous()


def gather_rows_matmul_triton(
    x: Tensor, w: Tensor, idx: Tensor, *,
    block_t: int | None = None, block_k: int | None = None, block_r: int | None = None,
    split: int | None = None, num_warps: int = 4, num_stages: int = 3,
) -> Tensor:
    """``x @ w[idx].T`` without materialising ``w[idx]``: (T, n), (m, n) any strides -> (T, k).

    Unset block sizes come from :func:`default_blocks`; ``split`` slices the n-reduction
    (default: enough programs for two waves of SMs on CUDA, 1 elsewhere).

    >>> import os, torch
    >>> if os.environ.get("TRITON_INTERPRET") == "1" and triton_available():
    ...     x, w = torch.randn(3, 24), torch.randn(24, 40).T   # w: transposed (m=40, n=24) view
    ...     idx = torch.tensor([7, 0, 33])
    ...     torch.testing.assert_close(gather_rows_matmul_triton(x, w, idx), x @ w[idx].T)
    """
    _require_triton()
    idx = _check(x, w, idx, "x", w.shape[1])
    T, K, N = x.shape[0], idx.numel(), w.shape[1]
    if T == 0 or K == 0 or N == 0:
        return torch.zeros((T, K), dtype=x.dtype, device=x.device)
    dt, dk, dr = default_blocks("gather", T)
    block_t, block_k, block_r = block_t or dt, block_k or dk, block_r or dr
    return _launch(_gather_rows_matmul_kernel, x, w, idx, T, K, N, block_t, block_k, block_r,
                   split, num_warps, num_stages)


def scatter_rows_matmul_triton(
    delta: Tensor, w: Tensor, idx: Tensor, *,
    block_t: int | None = None, block_n: int | None = None, block_r: int | None = None,
    split: int | None = None, num_warps: int = 4, num_stages: int = 3,
) -> Tensor:
    """``delta @ w[idx]`` without materialising ``w[idx]``: (T, k), (m, n) any strides -> (T, n).

    ``split`` slices the k-reduction over flagged neurons (default: enough programs for two waves
    of SMs on CUDA, 1 elsewhere); at decode n/BLOCK_N alone is far too few programs for an H100.

    >>> import os, torch
    >>> if os.environ.get("TRITON_INTERPRET") == "1" and triton_available():
    ...     d, w = torch.randn(3, 3), torch.randn(24, 40).T   # w: transposed (m=40, n=24) view
    ...     idx = torch.tensor([7, 0, 33])
    ...     torch.testing.assert_close(scatter_rows_matmul_triton(d, w, idx), d @ w[idx])
    """
    _require_triton()
    idx = _check(delta, w, idx, "delta", idx.numel())
    T, K, N = delta.shape[0], idx.numel(), w.shape[1]
    if T == 0 or K == 0 or N == 0:
        return torch.zeros((T, N), dtype=delta.dtype, device=delta.device)
    dt, dn, dr = default_blocks("scatter", T)
    block_t, block_n, block_r = block_t or dt, block_n or dn, block_r or dr
    return _launch(_scatter_rows_matmul_kernel, delta, w, idx, T, N, K, block_t, block_n, block_r,
                   split, num_warps, num_stages)
