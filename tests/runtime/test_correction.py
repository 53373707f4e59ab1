"""Flagged-neuron correction primitives: torch CPU path vs float64, Triton kernels (interpreter)."""

from __future__ import annotations

import os

# Must precede the first import of triton_kernels: @triton.jit reads it when decorating.
os.environ.setdefault("TRITON_INTERPRET", "1")

import doctest  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tardis_compiler.runtime import correction, triton_kernels  # noqa: E402
from tardis_compiler.runtime.correction import gather_rows_matmul, scatter_rows_matmul  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Relative rounding of one output element in each dtype (accumulation is float32 throughout).
OUT_RTOL = {torch.float32: 2e-6, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}

requires_triton = pytest.mark.skipif(
    not triton_kernels.triton_available(),
    reason="triton is not importable (it is the optional 'gpu' extra); Triton kernels untested",
)


def neuron_major(m: int, n: int, layout: str, dtype: torch.dtype,
                 gen: torch.Generator) -> torch.Tensor:
    """An (m, n) neuron-major view in the requested memory layout."""
    if layout == "rows":  # nn.Linear W1 / Conv1D W2: contiguous
        return torch.randn(m, n, generator=gen).to(dtype)
    if layout == "cols":  # nn.Linear W2 / Conv1D W1: transpose of a contiguous (n, m)
        return torch.randn(n, m, generator=gen).to(dtype).T
    if layout == "row_slice":  # rows contiguous, row stride > n (a slice of a wider matrix)
        return torch.randn(m, n + 7, generator=gen).to(dtype)[:, 3:n + 3]
    if layout == "strided":  # neither dimension unit-stride
        return torch.randn(2 * m, 2 * n, generator=gen).to(dtype)[::2, ::2]
    raise ValueError(layout)


def reference(a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor,
              side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 result and the float64 sum of |terms| (scales the accumulation error bound)."""
    a64, w64 = a.double(), w.double()[idx]
    if side == "gather":
        return a64 @ w64.T, a64.abs() @ w64.abs().T
    return a64 @ w64, a64.abs() @ w64.abs()


def assert_matches(out: torch.Tensor, a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor,
                   side: str) -> None:
    ref, absref = reference(a, w, idx, side)
    assert out.dtype == a.dtype
    assert out.shape == ref.shape
    # Output rounding, plus float32 accumulation error bounded by a fraction of sum |terms|.
    tol = OUT_RTOL[a.dtype] * ref.abs() + 1e-5 * absref + 1e-30
    err = (out.double() - ref).abs()
    bad = err > tol
    assert not bool(bad.any()), f"errors {err[bad].tolist()[:4]} > tol {tol[bad].tolist()[:4]}"


def random_idx(m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(m, generator=gen)[:k]  # duplicate-free, unsorted on purpose


# ---------------------------------------------------------------- torch CPU path
# m=64 and k in {0, 1, 5, 9, 40} (k/m = 0, 0.016, 0.078, 0.14, 0.62), T in {1, 3, 20}: reaches
# every CPU branch (embedding_bag / GEMM; dense / index_select / gather for column-major).
@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 3, 20])
@pytest.mark.parametrize("k", [0, 1, 5, 9, 40])
def test_cpu_matches_float64(layout: str, dtype: torch.dtype, T: int, k: int) -> None:
    check_cpu_case(layout, dtype, T, k)


# Other strides: rows contiguous with a longer row stride, and neither dimension unit-stride.
@pytest.mark.parametrize("layout", ["row_slice", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 20])
@pytest.mark.parametrize("k", [5, 40])
def test_cpu_other_strides_match_float64(layout: str, dtype: torch.dtype, T: int, k: int) -> None:
    check_cpu_case(layout, dtype, T, k)


def check_cpu_case(layout: str, dtype: torch.dtype, T: int, k: int) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{layout}{dtype}{T}{k}".encode()))
    m, n = 64, 48
    w = neuron_major(m, n, layout, dtype, gen)
    idx = random_idx(m, k, gen)
    x = torch.randn(T, n, generator=gen).to(dtype)
    delta = torch.randn(T, k, generator=gen).to(dtype)
    assert_matches(gather_rows_matmul(x, w, idx), x, w, idx, "gather")
    assert_matches(scatter_rows_matmul(delta, w, idx), delta, w, idx, "scatter")


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("T", [1, 20])
def test_cpu_noncontiguous_activations_and_int32_idx(layout: str, T: int) -> None:
    gen = torch.Generator().manual_seed(1)
    m, n, k = 64, 48, 9
    w = neuron_major(m, n, layout, torch.float32, gen)
    idx = random_idx(m, k, gen)
    x = torch.randn(n, T, generator=gen).T  # column-major activations
    delta = torch.randn(k, T, generator=gen).T
    assert_matches(gather_rows_matmul(x, w, idx.int()), x, w, idx, "gather")
    assert_matches(scatter_rows_matmul(delta, w, idx.int()), delta, w, idx, "scatter")


@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("T", [1, 20])
@pytest.mark.parametrize("frac", [0.0625, 0.5])
def test_cpu_accumulates_in_float32(layout: str, dtype: torch.dtype, T: int, frac: float) -> None:
    # Sums of ones: a 16-bit accumulator stalls (bf16 at 256, fp16 at 2048); float32 is exact,
    # and the powers of two below are exact in both output dtypes. frac picks the branch.
    def ones(m: int, n: int) -> torch.Tensor:
        if layout == "rows":
            return torch.ones(m, n, dtype=dtype)
        return torch.ones(n, m, dtype=dtype).T

    n = 4096  # gather: reduce over n features for k = frac * 64 neurons
    idx = torch.arange(int(frac * 64))
    out = gather_rows_matmul(torch.ones(T, n, dtype=dtype), ones(64, n), idx)
    assert bool((out == n).all()), out.unique()
    m = 32768  # scatter: reduce over k = frac * m neurons
    idx = torch.arange(0, m, int(1 / frac))
    out = scatter_rows_matmul(torch.ones(T, idx.numel(), dtype=dtype), ones(m, 8), idx)
    assert bool((out == idx.numel()).all()), out.unique()


def test_cpu_rejects_mismatches() -> None:
    w = torch.randn(10, 6)
    idx = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="dtype|bfloat16"):
        gather_rows_matmul(torch.randn(1, 6, dtype=torch.bfloat16), w, idx)
    with pytest.raises(ValueError, match="columns"):
        gather_rows_matmul(torch.randn(1, 5), w, idx)
    with pytest.raises(ValueError, match="columns"):
        scatter_rows_matmul(torch.randn(1, 3), w, idx)
    with pytest.raises(ValueError, match="2-D"):
        scatter_rows_matmul(torch.randn(2), w, idx)


def test_docstring_examples() -> None:
    for module in (correction, triton_kernels):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__


def test_triton_kernels_module_imports_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes `import triton` raise ImportError.
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("_tk_without_triton", triton_kernels.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton_available() is False
    with pytest.raises(RuntimeError, match="triton"):
        module.gather_rows_matmul_triton(torch.randn(1, 4), torch.randn(5, 4), torch.tensor([0]))


# ---------------------------------------------------------------- Triton kernels (interpreter)
# Tiny shapes: the interpreter runs every program instance in Python. T=1 takes the
# multiply-reduce path, T=3 the tl.dot path (BLOCK_T=16, masked).
@requires_triton
@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("k", [0, 5, 17])
def test_triton_matches_cpu_path(layout: str, dtype: torch.dtype, T: int, k: int) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(f"triton{layout}{dtype}{T}{k}".encode()))
    m, n = 40, 24
    w = neuron_major(m, n, layout, dtype, gen)
    idx = random_idx(m, k, gen)
    x = torch.randn(T, n, generator=gen).to(dtype)
    delta = torch.randn(T, k, generator=gen).to(dtype)
    # Two float32 sums in different orders can round to neighbouring 16-bit values.
    close = dict(rtol=2 * OUT_RTOL[dtype], atol=1e-4 if dtype == torch.float32 else 2e-2)

    g = triton_kernels.gather_rows_matmul_triton(x, w, idx)
    assert_matches(g, x, w, idx, "gather")
    torch.testing.assert_close(g, gather_rows_matmul(x, w, idx), **close)
    s = triton_kernels.scatter_rows_matmul_triton(delta, w, idx)
    assert_matches(s, delta, w, idx, "scatter")
    torch.testing.assert_close(s, scatter_rows_matmul(delta, w, idx), **close)


@requires_triton
@pytest.mark.parametrize("layout", ["rows", "cols"])
@pytest.mark.parametrize("T", [1, 3])
def test_triton_split_reduction(layout: str, T: int) -> None:
    # split > 1: float32 partials per reduction slice, summed by torch; ragged last slice.
    gen = torch.Generator().manual_seed(7)
    m, n, k = 40, 40, 17
    w = neuron_major(m, n, layout, torch.float32, gen)
    idx = random_idx(m, k, gen)
    x = torch.randn(T, n, generator=gen)
    delta = torch.randn(T, k, generator=gen)
    g = triton_kernels.gather_rows_matmul_triton(x, w, idx, split=3, block_r=16)  # 3 slices of n
    assert_matches(g, x, w, idx, "gather")
    s = triton_kernels.scatter_rows_matmul_triton(delta, w, idx, split=2, block_r=16)  # 2 of k
    assert_matches(s, delta, w, idx, "scatter")


@requires_triton
@pytest.mark.parametrize("T", [1, 3])
def test_triton_bf16_accumulates_in_float32(T: int) -> None:
    # 512 ones: a bf16 accumulator would stall at 256.
    n = 512
    idx = torch.tensor([0, 3, 5])
    out = triton_kernels.gather_rows_matmul_triton(
        torch.ones(T, n, dtype=torch.bfloat16), torch.ones(8, n, dtype=torch.bfloat16), idx)
    assert bool((out == n).all()), out.unique()
    idx = torch.arange(n)
    out = triton_kernels.scatter_rows_matmul_triton(
        torch.ones(T, n, dtype=torch.bfloat16), torch.ones(4, n, dtype=torch.bfloat16).T, idx)
    assert bool((out == n).all()), out.unique()


_COMPILE_FOR_H100 = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tardis_compiler.runtime import triton_kernels as tk

kernels = {"gather": (tk._gather_rows_matmul_kernel, "x_ptr", "BLOCK_K"),
           "scatter": (tk._scatter_rows_matmul_kernel, "d_ptr", "BLOCK_N")}
cases = [(side, T, "bf16") for side in kernels for T in (1, 16, 64)]
cases += [(side, 64, "fp32") for side in kernels]
for side, T, dtype in cases:
    kernel, a_ptr, out_block = kernels[side]
    block_t, block_out, block_r = tk.default_blocks(side, T)
    consts = {"BLOCK_T": block_t, out_block: block_out, "BLOCK_R": block_r,
              "USE_DOT": block_t >= 16, "UPCAST_DOT": False,
              "INPUT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    ptrs = {a_ptr: "*" + dtype, "w_ptr": "*" + dtype, "idx_ptr": "*i64", "out_ptr": "*" + dtype}
    signature = {name: "constexpr" if name in consts else ptrs.get(name, "i32")
                 for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert compiled.asm["cubin"], (side, T, dtype)
print("compiled", len(cases))
"""


@requires_triton
def test_triton_kernels_compile_for_h100() -> None:
    # The interpreter does not check what only the GPU compiler does (tl.dot tile minimums,
    # layouts, register pressure); compiling for sm_90 with triton's bundled ptxas needs no GPU.
    # A subprocess, because this session's kernels were decorated in interpreter mode.
    import subprocess

    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend in this install")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled 8" in proc.stdout
