"""Compile the fused FFN kernel at first use with the machine's C++ compiler, cache it on disk, and
load only a library this user built.

No prebuilt binary and no torch at build time: ``ffn_kernel.cpp`` (with ``ffn_simd.h``) includes
no torch header, so ``pip install`` builds nothing and a compiler is needed only here, at run
time. The shared library
is cached under ``$TARDIS_CACHE_DIR`` (default ``$XDG_CACHE_HOME/tardis_compiler``, else
``~/.cache/tardis_compiler``) in ``kernels/<key>/``, the key a hash of the source, the compiler and
its version, the flags, the CPU's features and the OpenMP library it links, so a change of any of
them rebuilds. Two processes building at once are safe: the build holds a file lock, and the
library is written under a temporary name and renamed.

Trust. Loading a shared library runs its code (its constructors run at ``dlopen``), and the cache
folder may be shared (``TARDIS_CACHE_DIR`` or ``XDG_CACHE_HOME`` pointing at a shared folder, a
world-writable home), so a cached ``.so`` is loaded only if this user built it:

* the cache root ``kernels/`` and the key's folder belong to this user (``os.geteuid()``) and are
  not group- or world-writable. Else nothing is loaded from there: the kernel is built in a fresh
  private temporary folder (``tempfile.mkdtemp()``, mode 0700) for this process, with a warning
  that says how to fix it (set ``TARDIS_CACHE_DIR`` to a private folder). Folders this module
  creates are mode 0700.
* the library file and its sidecar ``tardis_ffn_kernel.so.sha256`` are regular files (not links),
  belong to this user and are not group- or world-writable, and the library's sha256 is the one
  the sidecar recorded when it was built. The sidecar is written with the library, atomically
  like it, under the build lock.
* no check-then-load race: the library is opened once (``O_NOFOLLOW``), its descriptor is
  ``fstat``-ed and hashed, and ``dlopen`` loads that very descriptor (``/proc/self/fd/N``), so
  the bytes checked are the bytes loaded.

A cached library that fails a check is not loaded: it is deleted and rebuilt (with a warning).
``load_library(reject=digest)`` does the same for a library that passed the checks but does not
load or is not the tardis kernel (``kernel.py`` decides that and retries once).

OpenMP: the library links the very ``libgomp`` file torch loaded (found in ``/proc/self/maps``),
so there is one OpenMP runtime and one thread pool in the process, not two fighting over the cores.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("tardis_compiler")

SOURCE = Path(__file__).with_name("ffn_kernel.cpp")
HEADERS = (Path(__file__).with_name("ffn_simd.h"),)  # included by SOURCE: part of the cache key
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-fopenmp", "-fno-math-errno", "-Wall")
#: The library's file name in its key folder, and the suffix of its sha256 sidecar.
LIBRARY_NAME = "tardis_ffn_kernel.so"
DIGEST_SUFFIX = ".sha256"
_BUILD_TIMEOUT_S = 300
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a FIFO never hangs us


class KernelUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why (the torch path runs)."""


class LibraryUnusable(KernelUnavailable):
    """A library that passed the checks but that ``dlopen`` refused (corrupt); ``digest`` names
    the file, for ``load_library(reject=digest)``."""

    def __init__(self, message: str, digest: str) -> None:
        super().__init__(message)
        self.digest = digest


class LoadedLibrary(NamedTuple):
    """A loaded, verified kernel library: the ctypes handle, its cache path, its sha256."""

    lib: ctypes.CDLL
    path: Path
    digest: str


class _Untrusted(Exception):
    """A cached file fails a check; the message says which."""


def cache_dir() -> Path:
    """Where built kernels live: ``$TARDIS_CACHE_DIR/kernels``, else under ``$XDG_CACHE_HOME``, else
    ``~/.cache/tardis_compiler/kernels``. Used only if it is private (see the module docstring).

    Example:
        >>> cache_dir().name
        'kernels'
    """
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
    """Build the kernel if no trusted copy is cached yet, and return the path of the shared library
    (which passed the checks of the module docstring; ``load_library`` is what loads it safely).

    Example:
        >>> library_path().suffix
        '.so'
    """
    path, fd, _ = _trusted_library(reject=None)
    os.close(fd)
    return path


def load_library(reject: str | None = None) -> LoadedLibrary:
    """Build the kernel if no trusted copy is cached, verify it and load it (``dlopen`` of the
    verified descriptor). ``reject``: the sha256 of a library the caller found unusable; if the
    cache still holds that one, it is deleted and rebuilt first.

    Raises KernelUnavailable if it cannot be built, LibraryUnusable if ``dlopen`` refuses it.

    Example:
        >>> loaded = load_library()
        >>> loaded.path.name, len(loaded.digest)
        ('tardis_ffn_kernel.so', 64)
    """
    path, fd, digest = _trusted_library(reject)
    try:
        lib = _dlopen_fd(fd)
    except OSError as exc:
        raise LibraryUnusable(f"{path} does not load: {exc}", digest) from exc
    finally:
        os.close(fd)
    return LoadedLibrary(lib, path, digest)


def _trusted_library(reject: str | None) -> tuple[Path, int, str]:
    """(path, open descriptor, sha256) of a verified library, built first if none is cached; the
    caller closes the descriptor."""
    cxx = compiler()
    openmp = torch_openmp_library()
    folder = _kernel_folder(build_key(cxx, openmp))
    target = folder / LIBRARY_NAME
    if reject is None:
        with contextlib.suppress(FileNotFoundError, _Untrusted):
            return (target, *_open_trusted(target))
    with _locked(folder / "build.lock"):
        problem = None
        try:  # again under the lock: another process may have (re)built it while we waited
            fd, digest = _open_trusted(target)
        except FileNotFoundError:
            pass
        except _Untrusted as exc:
            problem = str(exc)
            log.warning("tardis: not loading the cached kernel %s: %s; building it again", target, exc)
        else:
            if digest != reject:
                return target, fd, digest
            os.close(fd)
            problem = "rejected"
        if problem is not None:
            _discard(target)
        _compile(cxx, openmp, folder, target)
        try:
            return (target, *_open_trusted(target))
        except (OSError, _Untrusted) as exc:
            raise KernelUnavailable(f"the kernel just built at {target} fails its checks: {exc}") from exc


def _digest_path(target: Path) -> Path:
    return target.with_name(target.name + DIGEST_SUFFIX)


def _stat_problem(st: os.stat_result, what: str, folder: bool = False) -> str | None:
    """Why a file or folder of this stat cannot be trusted, or None."""
    if not (stat.S_ISDIR(st.st_mode) if folder else stat.S_ISREG(st.st_mode)):
        return f"{what} is not a {'folder' if folder else 'regular file'}"
    if st.st_uid != os.geteuid():
        return f"{what} belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{what} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _folder_problem(folder: Path) -> str | None:
    """Why ``folder`` is no place to load a library from, or None if it is private to this user."""
    try:
        st = os.stat(folder)
    except OSError as exc:
        return f"{folder} cannot be examined ({exc.strerror})"
    return _stat_problem(st, str(folder), folder=True)


def _open_trusted(target: Path) -> tuple[int, str]:
    """Open the library at ``target`` and verify it through the descriptor: (descriptor, sha256).
    FileNotFoundError if there is none; _Untrusted if it fails a check."""
    try:
        fd = os.open(target, _OPEN_FLAGS)
    except FileNotFoundError:
        raise
    except OSError as exc:
        link = ", it is a symbolic link" if exc.errno == errno.ELOOP else ""
        raise _Untrusted(f"it cannot be opened safely ({exc.strerror}{link})") from exc
    try:
        problem = _stat_problem(os.fstat(fd), "the library")
        if problem:
            raise _Untrusted(problem)
        digest = _sha256_fd(fd)
        recorded = _recorded_digest(_digest_path(target))
        if digest != recorded:
            raise _Untrusted(f"its sha256 ({digest[:16]}...) is not the one recorded when it was built "
                             f"({recorded[:16]}...)")
        return fd, digest
    except BaseException:
        os.close(fd)
        raise


def _sha256_fd(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _recorded_digest(sidecar: Path) -> str:
    """The sha256 the sidecar recorded; _Untrusted if it is missing, foreign or malformed."""
    try:
        fd = os.open(sidecar, _OPEN_FLAGS)
    except OSError as exc:
        raise _Untrusted(f"its recorded sha256 {sidecar.name} cannot be read ({exc.strerror})") from exc
    try:
        problem = _stat_problem(os.fstat(fd), f"its recorded sha256 {sidecar.name}")
        if problem:
            raise _Untrusted(problem)
        text = os.read(fd, 256).decode("ascii", errors="replace").strip()
    finally:
        os.close(fd)
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise _Untrusted(f"its recorded sha256 {sidecar.name} is malformed")
    return text


def _discard(target: Path) -> None:
    """Delete a library that failed (and its sidecar): only called in a folder verified private."""
    for path in (target, _digest_path(target)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


_PRIVATE_ROOT: Path | None = None
_WARNED: set[str] = set()
_STATE_LOCK = threading.Lock()


def _kernel_folder(key: str) -> Path:
    """The key's folder in the cache, made (mode 0700) if missing; if the cache is not private to
    this user, the key's folder in a private temporary folder of this process instead."""
    root = cache_dir()
    try:
        _make_private_dirs(root)
        problem = _folder_problem(root)
        if problem is None:
            folder = root / key
            _make_private_dirs(folder)
            problem = _folder_problem(folder)
            if problem is None:
                return folder
    except OSError as exc:
        problem = f"{exc.filename or root} cannot be created ({exc.strerror})"
    private = _private_root()
    with _STATE_LOCK:
        first = problem not in _WARNED
        _WARNED.add(problem)
    if first:
        log.warning("tardis: not using the kernel cache %s: %s. Building the fused kernel in the private "
                    "temporary folder %s for this process instead (rebuilt by every process). To cache it, "
                    "set TARDIS_CACHE_DIR to a folder that only you own and can write (mkdir -m 700).",
                    root, problem, private)
    folder = private / key
    _make_private_dirs(folder)
    return folder


def _private_root() -> Path:
    """This process's private temporary folder (mode 0700, removed at exit)."""
    global _PRIVATE_ROOT
    with _STATE_LOCK:
        if _PRIVATE_ROOT is None or _folder_problem(_PRIVATE_ROOT) is not None:
            _PRIVATE_ROOT = Path(tempfile.mkdtemp(prefix="tardis_kernels_"))
            atexit.register(shutil.rmtree, _PRIVATE_ROOT, True)
        return _PRIVATE_ROOT


def _make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each mode 0700; existing ones are left alone."""
    missing = []
    while not os.path.lexists(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)


_DLOPEN_LOCK = threading.Lock()
_DLOPENED_NAMES: set[str] = set()


def _dlopen_fd(fd: int) -> ctypes.CDLL:
    """``dlopen`` the file open at ``fd`` (verified), through ``/proc/self/fd/N``.

    glibc hands back an already-loaded library when the name matches one loaded before, and
    descriptor numbers are reused: a name this process loaded before would return that old
    library, not this file. So the descriptor is duplicated until its name is new."""
    with _DLOPEN_LOCK:
        spares: list[int] = []
        try:
            name = f"/proc/self/fd/{fd}"
            while name in _DLOPENED_NAMES:
                spares.append(os.dup(fd))
                name = f"/proc/self/fd/{spares[-1]}"
            lib = ctypes.CDLL(name)
            _DLOPENED_NAMES.add(name)
            return lib
        finally:
            for spare in spares:
                os.close(spare)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _seal(path: str) -> str:
    """Make the freshly linked library mode 0700 and return its sha256 (both through one descriptor)."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        os.fchmod(fd, 0o700)
        return _sha256_fd(fd)
    finally:
        os.close(fd)


def _compile(cxx: str, openmp: str | None, folder: Path, target: Path) -> None:
    if openmp is None:
        raise KernelUnavailable("torch runs without OpenMP here; the kernel needs torch's OpenMP runtime")
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so.tmp")
    os.close(fd)
    fd, tmp_digest = tempfile.mkstemp(dir=folder, suffix=DIGEST_SUFFIX + ".tmp")  # mode 0600
    os.close(fd)
    obj = tmp + ".o"
    # Link torch's own libgomp by path, not -lgomp (which would be the system's copy).
    link = [openmp, f"-Wl,-rpath,{os.path.dirname(openmp)}"]
    steps = ([cxx, *FLAGS, "-c", str(SOURCE), "-o", obj],
             [cxx, "-shared", obj, *link, "-o", tmp])
    try:
        for cmd in steps:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S)
            if done.returncode:
                raise KernelUnavailable(f"compiling the kernel failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        with open(tmp_digest, "w") as f:
            f.write(_seal(tmp) + "\n")
        # Both atomic, under the build lock: the sidecar first, so that a library, once there, has its hash.
        os.replace(tmp_digest, _digest_path(target))
        os.replace(tmp, target)
        log.info("tardis: built the fused FFN kernel: %s", target)
    except subprocess.TimeoutExpired as exc:
        raise KernelUnavailable(f"compiling the kernel took over {_BUILD_TIMEOUT_S} s") from exc
    finally:
        for path in (tmp, obj, tmp_digest):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
