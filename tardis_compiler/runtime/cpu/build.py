"""Compile the fused FFN kernel at first use with the machine's C++ compiler, and cache it on disk.

No prebuilt binary and no torch at build time: ``ffn_kernel.cpp`` (with ``ffn_simd.h``) includes
no torch header, so ``pip install`` builds nothing and a compiler is needed only here, at run
time. The shared library
is cached under ``$TARDIS_CACHE_DIR`` (default ``~/.cache/tardis_compiler``) in a folder named by a
hash of the source, the compiler and its version, the flags, the CPU's features and the OpenMP
library it links, so a change of any of them rebuilds. Two processes building at once are safe:
the build holds a file lock, and the library is written under a temporary name and renamed.

OpenMP: the library links the very ``libgomp`` file torch loaded (found in ``/proc/self/maps``),
so there is one OpenMP runtime and one thread pool in the process, not two fighting over the cores.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("tardis_compiler")

SOURCE = Path(__file__).with_name("ffn_kernel.cpp")
HEADERS = (Path(__file__).with_name("ffn_simd.h"),)  # included by SOURCE: part of the cache key
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-fopenmp", "-fno-math-errno", "-Wall")
_BUILD_TIMEOUT_S = 300


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why (the torch path runs)."""


def cache_dir() -> Path:
    """Where built kernels live: ``$TARDIS_CACHE_DIR``, else ``~/.cache/tardis_compiler``."""
    root = os.environ.get("TARDIS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tardis_compiler")
    return Path(root) / "kernels"


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else ``g++``, else ``c++``; KernelUnavailable if none exists."""
    for name in (os.environ.get("CXX"), "g++", "c++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise KernelUnavailable("no C++ compiler found (install g++, or set CXX)")


def torch_openmp_library() -> str | None:
    """The libgomp file torch loaded into this process (None if torch uses no OpenMP)."""
    import torch  # noqa: F401  (torch must be loaded: its libgomp is what we look for)

    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if "libgomp" in os.path.basename(path):
                return path
    return None


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown"
    lines = [line for line in info.splitlines() if line.startswith(("flags", "model name"))]
    return "\n".join(sorted(set(lines)))


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"the C++ compiler {cxx} does not run: {exc}") from exc


def build_key(cxx: str, openmp: str | None) -> str:
    """Hash of everything the library depends on."""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), *(h.read_bytes() for h in HEADERS), cxx.encode(),
                 _compiler_version(cxx).encode(), " ".join(FLAGS).encode(),
                 _cpu_features().encode(), str(openmp).encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:20]


def library_path() -> Path:
    """Build the kernel if it is not cached yet, and return the path of the shared library.

    Example:
        >>> library_path().suffix
        '.so'
    """
    cxx = compiler()
    openmp = torch_openmp_library()
    folder = cache_dir() / build_key(cxx, openmp)
    target = folder / "tardis_ffn_kernel.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / "build.lock"):
        if target.exists():  # another process built it while we waited
            return target
        _compile(cxx, openmp, folder, target)
    return target


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _compile(cxx: str, openmp: str | None, folder: Path, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    obj = tmp + ".o"
    if openmp is None:
        raise KernelUnavailable("torch runs without OpenMP here; the kernel needs torch's OpenMP runtime")
    # Link torch's own libgomp by path, not -lgomp (which would be the system's copy).
    link = [openmp, f"-Wl,-rpath,{os.path.dirname(openmp)}"]
    steps = ([cxx, *FLAGS, "-c", str(SOURCE), "-o", obj],
             [cxx, "-shared", obj, *link, "-o", tmp])
    try:
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
            if done.returncode:
                raise KernelUnavailable(f"compiling the kernel failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: readers see the whole library or none
        log.info("tardis: built the fused FFN kernel: %s", target)
    except subprocess.TimeoutExpired as exc:
        raise KernelUnavailable(f"compiling the kernel took over {_BUILD_TIMEOUT_S} s") from exc
    finally:
        for path in (tmp, obj):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
