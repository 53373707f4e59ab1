"""The fused FFN kernel, loaded through ctypes (built by ``build.py`` on first use).

``kernel()`` returns the loaded library, or None when it cannot be had here (no compiler, a failed
build, ``TARDIS_KERNEL=off``, a library that would not load twice); ``status()`` says which, in
words the explain report prints. A forward never fails because of the kernel cache: the op takes
the torch path when ``kernel()`` is None.

What is loaded: only a library this user built, verified before ``dlopen`` (owner, mode, sha256
recorded at build time; ``build.py`` says how, and why: the cache folder may be shared, and loading
a library runs its code). A verified library that ``dlopen`` refuses (corrupt), that lacks the
tardis entry points, or whose ``tardis_meta_layout()`` is not this package's pack layout is deleted
and rebuilt once; if the rebuilt one fails too, the torch path runs, with a warning.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from ..layout import LAYOUT_VERSION, META_FIELDS
from .build import KernelUnavailable, LibraryUnusable, load_library

log = logging.getLogger("tardis_compiler")

#: Most tokens one kernel call takes (its per-neuron token masks are 64-bit).
MAX_TOKENS = 64
#: Element-type codes the entry points take with every buffer (``BufferType`` in ffn_kernel.cpp,
#: whose ``tardis_buffer_types()`` lists the same names in the same order); -1: any other dtype.
BUFFER_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3, torch.uint8: 4,
                torch.int8: 5, torch.int32: 6, torch.int64: 7}
_ERRORS = {-1: "bad magic number", -2: "layout version", -3: "buffer sizes differ from the meta's",
           -4: "shapes or codes out of range", -5: "meta offsets or sizes differ from its shapes",
           -6: "guard fields inconsistent", -8: "x has the wrong number of features", -9: "tokens out of range",
           -10: "int8 bundle fields inconsistent", -11: "a buffer's element type is not the pack's",
           -12: "the output buffer has the wrong size or type", -13: "the activation is not the pack's",
           -14: "exact_all must be 0 or 1"}


def buffer_type_names() -> str:
    """The element types of ``BUFFER_TYPES`` in code order, as the library lists its own."""
    return ",".join(str(t).removeprefix("torch.") for t, _ in sorted(BUFFER_TYPES.items(), key=lambda kv: kv[1]))


def _buffer(t: torch.Tensor) -> tuple[int, int, int]:
    """(address, element type, element count) of a buffer the kernel will read or write: CPU and
    contiguous, else ValueError (the kernel reads ``numel`` elements from the address onwards)."""
    if not isinstance(t, torch.Tensor) or not t.is_cpu or not t.is_contiguous():
        raise ValueError("tardis kernel: every buffer must be a contiguous CPU tensor")
    return t.data_ptr(), BUFFER_TYPES.get(t.dtype, -1), t.numel()


class FusedKernel:
    """The loaded library: ``ffn`` runs one FFN call on a pack's tensors. Every entry point is
    given each buffer's element type and size and refuses a call that does not fit the pack's
    meta, before it reads anything."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.lib, self.path = lib, path
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        buffer = [ptr, i64, i64]  # address, element type, element count
        f = lib.tardis_ffn
        f.argtypes = buffer * 6 + [i64, i64, i64, ctypes.c_int, ptr]
        f.restype = ctypes.c_int
        self._ffn = f
        lib.tardis_simd_width.restype = ctypes.c_int
        self.simd_width = lib.tardis_simd_width()
        check = lib.tardis_check_meta
        check.argtypes = [ptr, i64, i64, i64]
        check.restype = ctypes.c_int
        self._check = check
        predict = lib.tardis_guard_predict
        predict.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, i64, i64, i64, i64, ptr, i64, i64, i64,
                            ctypes.c_int]
        predict.restype = ctypes.c_int
        self._predict = predict
        lib.tardis_buffer_types.restype = ctypes.c_char_p
        self.buffer_types = lib.tardis_buffer_types().decode()

    def ffn(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, guard: torch.Tensor,
            floats: torch.Tensor, meta: torch.Tensor, activation_code: int,
            counters: torch.Tensor | None = None, exact_all: bool = False) -> None:
        """y = the FFN of x: (..., features) CPU tensors, contiguous, in the pack's dtype;
        ``activation_code``: the ``KERNEL_ACTIVATIONS`` code of the activation the caller means.
        ``exact_all``: no guard, every bundled neuron exact for every token (``torch_path.ffn_exact``'s
        function, with the bundles widened to float32 as they are read).
        Raises ValueError if the buffers do not form a valid pack of that activation (the kernel
        checks before it reads anything)."""
        tokens = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        if counters is not None and (counters.dtype != torch.int64 or counters.numel() < 3):
            raise ValueError("tardis kernel: counters must hold 3 int64")
        status = self._ffn(*_buffer(x), *_buffer(y), *_buffer(weights), *_buffer(guard), *_buffer(floats),
                           *_buffer(meta), tokens, activation_code, int(exact_all), torch.get_num_threads(),
                           _buffer(counters)[0] if counters is not None else None)
        if status:
            raise ValueError(f"tardis kernel refused the call: {_ERRORS.get(status, status)}")

    def guard_predict(self, x: torch.Tensor, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor,
                      meta: torch.Tensor, rows: int) -> torch.Tensor:
        """A low-bit guard's (tokens, rows) float32 predictions for x (tokens, d_in), contiguous in
        the pack's dtype: the batched path's flags, with this kernel's arithmetic."""
        out = torch.empty(x.shape[0], rows)
        out_address, _, out_numel = _buffer(out)
        _, weights_type, n_weights = _buffer(weights)  # only sized and typed: the guard never reads them
        _, floats_type, n_floats = _buffer(floats)
        status = self._predict(*_buffer(x), out_address, out_numel, weights_type, n_weights, *_buffer(guard),
                               floats_type, n_floats, *_buffer(meta), x.shape[0], torch.get_num_threads())
        if status:
            raise ValueError(f"tardis kernel refused to run the guard: {_ERRORS.get(status, status)}")
        return out

    def check(self, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor, meta: torch.Tensor) -> str | None:
        """None if the buffers form a valid pack for the kernel, else what is wrong."""
        if meta.dtype != torch.int64 or meta.numel() != len(META_FIELDS) or not meta.is_contiguous():
            return "meta is not the layout's int64 fields"
        status = self._check(meta.data_ptr(), weights.numel(), guard.numel(), floats.numel())
        return _ERRORS.get(status, str(status)) if status else None


#: Entry points a library must export to be the tardis kernel (FusedKernel binds more, and a
#: missing one raises AttributeError there, handled the same way).
_SYMBOLS = ("tardis_meta_layout", "tardis_layout_version", "tardis_ffn", "tardis_check_meta",
            "tardis_guard_predict", "tardis_simd_width", "tardis_buffer_types")


@functools.cache
def _load() -> FusedKernel | str:
    """The kernel, or why not (a line for ``status``). Never raises: a library that fails is
    rebuilt once (``load_library(reject=...)``), then the torch path runs."""
    if os.environ.get("TARDIS_KERNEL", "").lower() in ("0", "off", "false", "no"):
        return "disabled by TARDIS_KERNEL=off"
    reject, problem = None, "not loaded"
    for attempt in range(2):
        try:
            loaded = load_library(reject=reject)
        except LibraryUnusable as exc:  # verified, but dlopen refused it: a corrupt file
            problem, reject = str(exc), exc.digest
        except (KernelUnavailable, OSError) as exc:
            return _unavailable(str(exc))
        else:
            problem = _library_problem(loaded.lib, loaded.path)
            if problem is None:
                try:
                    return FusedKernel(loaded.lib, str(loaded.path))
                except (AttributeError, TypeError, ValueError) as exc:  # a missing or odd entry point
                    problem = f"{loaded.path} is not the tardis kernel ({type(exc).__name__}: {exc})"
            reject = loaded.digest
        if attempt == 0:
            log.warning("tardis: %s; deleting it and building the kernel again", problem)
    return _unavailable(f"{problem} (after a rebuild)")


def _library_problem(lib: ctypes.CDLL, path: object) -> str | None:
    """Why a loaded library is not this package's kernel, or None."""
    missing = [name for name in _SYMBOLS if not hasattr(lib, name)]
    if missing:
        return f"{path} is not the tardis kernel (it has no {', '.join(missing)})"
    lib.tardis_meta_layout.restype = ctypes.c_char_p
    lib.tardis_layout_version.restype = ctypes.c_int64
    raw = lib.tardis_meta_layout()
    fields = tuple(raw.decode("ascii", errors="replace").split(",")) if raw else ()
    if fields != META_FIELDS or lib.tardis_layout_version() != LAYOUT_VERSION:
        return f"{path} has another pack layout than this package"
    lib.tardis_buffer_types.restype = ctypes.c_char_p
    if (lib.tardis_buffer_types() or b"").decode("ascii", errors="replace") != buffer_type_names():
        return f"{path} numbers element types differently from this package"
    return None


def _unavailable(why: str) -> str:
    log.warning("tardis: the fused CPU kernel is unavailable, FFNs run the slower torch path: %s", why)
    return f"unavailable: {why}".splitlines()[0]


def kernel() -> FusedKernel | None:
    """The fused kernel, built and loaded on first call; None where it cannot run.

    Example:
        >>> k = kernel()
        >>> k is None or k.simd_width in (1, 8, 16)
        True
    """
    loaded = _load()
    return loaded if isinstance(loaded, FusedKernel) else None


def status() -> str:
    """One line: which CPU path FFNs take here and why.

    Example:
        >>> status().startswith(("fused CPU kernel", "torch path"))
        True
    """
    loaded = _load()
    if isinstance(loaded, FusedKernel):
        isa = {16: "AVX-512", 8: "AVX2"}.get(loaded.simd_width, "portable C++")
        return f"fused CPU kernel ({isa}, {torch.get_num_threads()} threads)"
    return f"torch path: the fused CPU kernel is {loaded}"


def reset() -> None:
    """Forget the load result (tests that change TARDIS_KERNEL or the cache directory): the next
    ``kernel()`` finds, verifies and loads the library again.

    Example:
        >>> reset()
        >>> status().startswith(("fused CPU kernel", "torch path"))
        True
    """
    _load.cache_clear()
