"""Building the fused kernel: on-disk cache keyed by what it depends on, safe concurrent builds,
torch's OpenMP runtime, and the torch path (with a reason) where no compiler exists."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from tardis_compiler.runtime import ffn_op
from tardis_compiler.runtime.cpu import build, kernel
from tests.runtime.pack_cases import Case, make

has_compiler = pytest.mark.skipif(kernel.kernel() is None, reason="the fused CPU kernel cannot be built here")


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """An empty kernel cache and a forgotten load result; restored afterwards."""
    monkeypatch.setenv("TARDIS_CACHE_DIR", str(tmp_path / "cache"))
    kernel.reset()
    yield tmp_path / "cache"
    monkeypatch.undo()
    kernel.reset()


def test_key_changes_with_flags_and_source(monkeypatch):
    cxx = build.compiler()
    key = build.build_key(cxx, build.torch_openmp_library())
    monkeypatch.setattr(build, "FLAGS", (*build.FLAGS, "-DTARDIS_TEST"))
    assert build.build_key(cxx, build.torch_openmp_library()) != key
    monkeypatch.setattr(build, "_cpu_features", lambda: "another cpu")
    assert build.build_key(cxx, build.torch_openmp_library()) != key


@has_compiler
def test_build_is_cached_and_links_torchs_openmp(fresh_kernel):
    path = build.library_path()
    assert path.is_file() and str(path).startswith(str(fresh_kernel))
    assert build.library_path() == path  # second call: the cache
    needed = subprocess.run(["ldd", str(path)], capture_output=True, text=True).stdout
    assert build.torch_openmp_library() in needed  # torch's own libgomp, not the system's


@has_compiler
def test_two_processes_building_at_once_both_succeed(fresh_kernel):
    script = textwrap.dedent("""
        import torch
        from tardis_compiler.runtime.cpu.kernel import kernel
        assert kernel() is not None
        print("ok")
    """)
    env = {"TARDIS_CACHE_DIR": str(fresh_kernel), "PATH": __import__("os").environ["PATH"]}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert len(list(fresh_kernel.rglob("*.so"))) == 1
    assert not list(fresh_kernel.rglob("*.tmp"))


def test_without_a_compiler_the_torch_path_runs_and_says_so(fresh_kernel, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CXX", raising=False)
    assert kernel.kernel() is None
    assert kernel.status().startswith("torch path") and "compiler" in kernel.status()
    case = Case("gated", 16, 8, 20, guard="int8")
    _, _, x, pack = make(case, 1)
    y = ffn_op.ffn(x, pack)
    assert y.shape == (1, 8) and torch.isfinite(y).all()


def test_disabled_by_environment(fresh_kernel, monkeypatch):
    monkeypatch.setenv("TARDIS_KERNEL", "off")
    assert kernel.kernel() is None and "TARDIS_KERNEL=off" in kernel.status()


def test_compile_errors_are_reported_not_raised(fresh_kernel, monkeypatch, tmp_path):
    bad = tmp_path / "bad.cpp"
    bad.write_text("this is not C++")
    monkeypatch.setattr(build, "SOURCE", bad)
    assert kernel.kernel() is None
    assert "compiling the kernel failed" in kernel.status()


def test_explain_says_which_path_runs(fresh_kernel, monkeypatch):
    import tardis_compiler as tc

    monkeypatch.setenv("TARDIS_KERNEL", "off")
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    report = tc.explain(mlp, torch.randn(64, 16), inner="eager", calibration_calls=1)
    assert any("torch path" in note and "TARDIS_KERNEL=off" in note for g in report.graphs for note in g.notes)
    assert "FFN runtime: torch path" in str(report)


def test_the_portable_build_computes_the_same(fresh_kernel, monkeypatch):
    """Built for a CPU without AVX-512, the kernel takes its portable loops: same results."""
    from tardis_compiler.runtime.torch_path import ffn_torch

    if kernel.kernel() is None:
        pytest.skip("the fused CPU kernel cannot be built here")
    kernel.reset()
    monkeypatch.setattr(build, "FLAGS", tuple(f if f != "-march=native" else "-march=x86-64-v2" for f in build.FLAGS))
    portable = kernel.kernel()
    assert portable is not None and portable.simd_width == 1
    for guard in ("int8", "int4", "int2", "svd", "all"):
        for dtype in (torch.float32, torch.bfloat16):
            _, _, x, pack = make(Case("gated", 70, 20, 90, guard=guard, dtype=dtype, group=64), 3)
            expected, _ = ffn_torch(x, *pack.tensors(), pack.layout)
            y = torch.empty_like(expected)
            portable.ffn(x, y, 3, *pack.tensors())
            tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
            scale = max(1.0, expected.float().abs().max().item())
            torch.testing.assert_close(y.float() / scale, expected.float() / scale, **tol)
