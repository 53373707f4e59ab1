"""The fused kernel built with AddressSanitizer: the op's fuzz, direct abuse of its entry points and
a sample of hostile checkpoints run clean (asan_worker.py, in a subprocess with libasan preloaded).
A positive control first shows that an out-of-bounds read of a torch buffer is caught in this
setup, so a clean run means something."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hf.hostile import cases, write_case
from tests.hf.test_hostile_checkpoints import bad_outcomes, save_checkpoint

ROOT = Path(__file__).resolve().parents[3]
CXX = shutil.which(os.environ.get("CXX") or "g++")


def _library(name: str) -> str | None:
    if CXX is None:
        return None
    path = subprocess.run([CXX, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


LIBASAN = _library("libasan.so")
# Preloaded beside libasan: python does not link libstdc++, and without it at start-up ASan's
# __cxa_throw interceptor has nothing to forward to, so the first C++ exception torch throws (and
# catches: e.g. when torchao registers its ops) aborts the process.
LIBSTDCXX = _library("libstdc++.so")
pytestmark = pytest.mark.skipif(LIBASAN is None, reason="needs g++ with AddressSanitizer (libasan)")


def _asan_env(tmp_path: Path) -> dict:
    return {**os.environ, "LD_PRELOAD": ":".join(p for p in (LIBASAN, LIBSTDCXX) if p), "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1",
            "TARDIS_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}


def test_asan_catches_a_read_past_a_torch_buffer(tmp_path):
    """Positive control: one float past a torch tensor's end is reported."""
    source = tmp_path / "overflow.c"
    source.write_text("float read_at(const float* p, long i) { return p[i]; }\n")
    library = tmp_path / "overflow.so"
    subprocess.run([CXX, "-x", "c", "-shared", "-fPIC", "-fsanitize=address", str(source), "-o", str(library)],
                   check=True)
    code = ("import ctypes, torch\nlib = ctypes.CDLL(%r)\nlib.read_at.restype = ctypes.c_float\n"
            "t = torch.zeros(16)\nlib.read_at(ctypes.c_void_p(t.data_ptr()), 15)\nprint('in bounds ok', flush=True)\n"
            "lib.read_at(ctypes.c_void_p(t.data_ptr()), 16)\n" % str(library))
    proc = subprocess.run([sys.executable, "-c", code], env=_asan_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert "in bounds ok" in proc.stdout
    assert proc.returncode != 0 and "heap-buffer-overflow" in proc.stderr, proc.stderr[-2000:]


def test_kernel_fuzz_abuse_and_hostile_checkpoints_under_asan(tmp_path):
    source = save_checkpoint("llama", "bfloat16", tmp_path / "pristine")
    chosen = random.Random(1).sample(cases(source, seed=0), 40)
    listed = []
    for i, (name, mutate) in enumerate(chosen):
        write_case(source, tmp_path / f"case{i}", mutate)
        listed.append((name, str(tmp_path / f"case{i}")))
    listing = tmp_path / "listing.json"
    listing.write_text(json.dumps({"dtype": "bfloat16", "pristine": str(source), "cases": listed}))
    proc = subprocess.run([sys.executable, "-m", "tests.runtime.cpu.asan_worker", str(listing)], cwd=ROOT,
                          env=_asan_env(tmp_path), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0 and "ASAN OK" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-4000:])
    built = next((tmp_path / "cache").rglob("tardis_ffn_kernel.so"))
    symbols = subprocess.run(["nm", "-D", str(built)], capture_output=True, text=True).stdout
    assert "__asan_" in symbols  # the library that ran was the instrumented one
    abuse = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("abuse"))[6:])
    assert abuse["refused"] > 10 * abuse["ran"]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(listed) and not bad_outcomes(results)
