"""Building the fused kernel: on-disk cache keyed by what it depends on, safe concurrent builds,
torch's OpenMP runtime, and the torch path (with a reason) where no compiler exists. Loading only
what this user built: planted, foreign, tampered, symbol-less or corrupt libraries and shared
cache folders are never loaded from, and a forward never fails because of them."""
from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tardis_compiler.runtime import ffn_op
from tardis_compiler.runtime.cpu import build, kernel
from tardis_compiler.runtime.layout import KERNEL_ACTIVATIONS
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


def _cpu_flags() -> set[str]:
    with open("/proc/cpuinfo") as f:
        return {flag for line in f if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


@pytest.mark.parametrize("march,width", [("x86-64-v2", 1), ("x86-64-v3", 8)], ids=["portable", "avx2"])
def test_each_isa_build_computes_the_same(fresh_kernel, monkeypatch, march, width):
    """Built for a CPU without AVX-512 (x86-64-v3: AVX2 + FMA; x86-64-v2: neither), the kernel takes
    its AVX2 or portable loops: the op's fuzz cases give the torch path's results."""
    from tardis_compiler.runtime.torch_path import ffn_torch
    from tests.runtime.test_ffn_op import WIDE_CASES, _random_cases, check_exact_all, check_one_token_guard

    if kernel.kernel() is None:
        pytest.skip("the fused CPU kernel cannot be built here")
    if width == 8 and not {"avx2", "fma"} <= _cpu_flags():
        pytest.skip("this CPU cannot run an AVX2 build")
    kernel.reset()
    monkeypatch.setattr(build, "FLAGS", tuple(f if f != "-march=native" else f"-march={march}" for f in build.FLAGS))
    built = kernel.kernel()
    assert built is not None and built.simd_width == width
    cases = [(Case("gated", 70, 20, 90, guard=guard, dtype=dtype, group=64), 3)
             for guard in ("int8", "int4", "int2", "svd", "all") for dtype in (torch.float32, torch.bfloat16)]
    cases += [(case, tokens) for case, tokens, _ in _random_cases(40, seed=3)]
    for case, tokens in cases:
        _, _, x, pack = make(case, tokens)
        expected, _ = ffn_torch(x, *pack.tensors(), pack.layout)
        y = torch.empty_like(expected)
        built.ffn(x, y, *pack.tensors(), KERNEL_ACTIVATIONS[pack.activation])
        tol = dict(atol=1e-4, rtol=1e-4) if case.dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
        scale = max(1.0, expected.float().abs().max().item())
        torch.testing.assert_close(y.float() / scale, expected.float() / scale, **tol, msg=lambda m: f"{case}: {m}")
    for guard in ("int4", "int2"):  # one token's sub-byte guard over more groups than one vector of scales
        check_one_token_guard(built, guard, torch.float32)
    for i, case in enumerate(WIDE_CASES + [c for c, _ in cases[::3]]):  # exact_all: 8- and 4-token blocks, a tail
        check_exact_all(built, case, 13, threads=1 + i % 2)


# --- Loading only what this user built ------------------------------------------------------------

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Libraries an attacker could leave in the cache: one whose constructor writes ``marker`` when
    it is loaded, one without the tardis symbols; as bytes."""
    folder = tmp_path_factory.mktemp("planted")
    marker = folder / "constructor-ran"
    sources = {
        "constructor": f"""
            #include <stdio.h>
            __attribute__((constructor)) static void planted(void) {{
                FILE* f = fopen("{marker}", "w");
                if (f) {{ fputs("ran", f); fclose(f); }}
            }}
            int tardis_simd_width(void) {{ return 16; }}
        """,
        "no_symbols": "int not_the_tardis_kernel(void) { return 0; }\n",
    }
    libs = {}
    for name, source in sources.items():
        (folder / f"{name}.c").write_text(source)
        out = folder / f"{name}.so"
        subprocess.run([build.compiler(), "-x", "c", "-shared", "-fPIC", str(folder / f"{name}.c"), "-o", str(out)],
                       check=True, capture_output=True)
        libs[name] = out.read_bytes()
    return SimpleNamespace(marker=marker, **libs)


def _key_folder() -> Path:
    """The folder the cache would load this build's library from, made private (0700)."""
    folder = build.cache_dir() / build.build_key(build.compiler(), build.torch_openmp_library())
    folder.mkdir(parents=True, exist_ok=True)
    for path in (build.cache_dir(), folder):
        path.chmod(0o700)
    return folder


def _plant(folder: Path, data: bytes, sidecar: str) -> Path:
    """``data`` as the cached library, with a sidecar that is missing, forged or matching."""
    target = folder / build.LIBRARY_NAME
    target.write_bytes(data)
    target.chmod(0o700)
    recorded = {"missing": None, "forged": hashlib.sha256(b"another library").hexdigest(),
                "matching": hashlib.sha256(data).hexdigest()}[sidecar]
    if recorded is not None:
        (folder / (build.LIBRARY_NAME + build.DIGEST_SUFFIX)).write_text(recorded + "\n")
    return target


def _forward_runs() -> None:
    """The op, through whichever path ``kernel()`` allows, computes the torch path's result."""
    from tardis_compiler.runtime.torch_path import ffn_torch

    _, _, x, pack = make(Case("gated", 16, 8, 20, guard="int8"), 1)
    y = ffn_op.ffn(x, pack)
    expected, _ = ffn_torch(x, *pack.tensors(), pack.layout)
    assert y.shape == (1, 8) and torch.isfinite(y).all()
    torch.testing.assert_close(y.reshape(expected.shape), expected, atol=1e-4, rtol=1e-4)


@has_compiler
@pytest.mark.parametrize("case", ["missing sidecar", "forged sidecar", "foreign owner"])
def test_a_planted_library_is_never_loaded_and_is_rebuilt(fresh_kernel, planted, case, caplog):
    if case == "foreign owner" and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    planted.marker.unlink(missing_ok=True)
    target = _plant(_key_folder(), planted.constructor, case.split()[0] if "sidecar" in case else "matching")
    if case == "foreign owner":  # its hash matches: only the owner gives it away
        os.chown(target, 65534, 65534)
    with caplog.at_level(logging.WARNING, logger="tardis_compiler"):
        k = kernel.kernel()
    assert not planted.marker.exists()  # its constructor never ran
    assert k is not None and k.path == str(target) and k.simd_width in (1, 16)
    assert target.read_bytes() != planted.constructor and target.stat().st_uid == os.geteuid()
    assert "not loading the cached kernel" in caplog.text
    _forward_runs()


@has_compiler
def test_a_library_without_the_tardis_symbols_is_rebuilt(fresh_kernel, planted, caplog):
    """It passed every check (matching sidecar): loading it fails at its symbols, not the forward."""
    target = _plant(_key_folder(), planted.no_symbols, "matching")
    with caplog.at_level(logging.WARNING, logger="tardis_compiler"):
        k = kernel.kernel()
    assert k is not None and k.path == str(target)  # the rebuilt one, not the symbol-less one loaded before
    assert "is not the tardis kernel" in caplog.text and "building the kernel again" in caplog.text
    assert kernel.status().startswith("fused CPU kernel")
    _forward_runs()


@has_compiler
def test_a_corrupt_library_is_rebuilt_once(fresh_kernel, caplog):
    target = _plant(_key_folder(), os.urandom(4096), "matching")
    with caplog.at_level(logging.WARNING, logger="tardis_compiler"):
        k = kernel.kernel()
    assert k is not None and k.path == str(target)
    assert "does not load" in caplog.text and "building the kernel again" in caplog.text
    _forward_runs()


@has_compiler
def test_if_the_rebuilt_library_fails_too_the_torch_path_runs(fresh_kernel, planted, monkeypatch, caplog):
    """A "compiler" whose every output lacks the symbols: one rebuild, then the torch path."""
    builds = []

    def compile_without_symbols(cxx, openmp, folder, target):
        builds.append(target)
        _plant(folder, planted.no_symbols, "matching")

    monkeypatch.setattr(build, "_compile", compile_without_symbols)
    with caplog.at_level(logging.WARNING, logger="tardis_compiler"):
        assert kernel.kernel() is None
    assert len(builds) == 2  # built, rejected, rebuilt once
    assert kernel.status().startswith("torch path") and "is not the tardis kernel" in kernel.status()
    assert "FFNs run the slower torch path" in caplog.text
    _forward_runs()


@has_compiler
@pytest.mark.parametrize("shared", ["kernels folder 775", "key folder 777"])
def test_a_group_writable_cache_is_not_loaded_from(fresh_kernel, planted, monkeypatch, tmp_path, caplog, shared):
    """A shared cache folder: its library (which passes every other check) is not loaded; the
    kernel is built in a private temporary folder, and the warning says how to fix it."""
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    monkeypatch.setattr(build, "_PRIVATE_ROOT", None)
    planted.marker.unlink(missing_ok=True)
    target = _plant(_key_folder(), planted.constructor, "matching")
    (build.cache_dir() if shared.startswith("kernels") else target.parent).chmod(int(shared.split()[-1], 8))
    with caplog.at_level(logging.WARNING, logger="tardis_compiler"):
        k = kernel.kernel()
    assert not planted.marker.exists()
    assert k is not None and Path(k.path).is_relative_to(private_tmp)
    assert all((Path(k.path).parents[i].stat().st_mode & 0o777) == 0o700 for i in (0, 1))
    assert target.read_bytes() == planted.constructor  # the shared folder is left alone
    assert "group- or world-writable" in caplog.text and "TARDIS_CACHE_DIR" in caplog.text
    _forward_runs()
