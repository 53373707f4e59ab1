"""The fused FFN kernel, loaded through ctypes (built by ``build.py`` on first use).

``kernel()`` returns the loaded library, or None when it cannot be had here (no compiler, a failed
build, ``TARDIS_KERNEL=off``); ``status()`` says which, in words the explain report prints.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os

import torch

from ..layout import LAYOUT_VERSION, META_FIELDS
from .build import KernelUnavailable, library_path

log = logging.getLogger("tardis_compiler")

#: Most tokens one kernel call takes (its per-neuron token masks are 64-bit).
MAX_TOKENS = 64
_ERRORS = {-1: "bad magic number", -2: "layout version", -3: "buffer sizes differ from the meta's",
           -4: "shapes or codes out of range", -5: "weights buffer too small", -6: "guard buffer inconsistent",
           -7: "floats buffer too small", -8: "x has the wrong number of features", -9: "tokens out of range"}


class FusedKernel:
    """The loaded library: ``ffn`` runs one FFN call on a pack's tensors."""

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.lib, self.path = lib, path
        f = lib.tardis_ffn
        f.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 5 + [ctypes.c_int, ctypes.c_void_p]
        f.restype = ctypes.c_int
        self._ffn = f
        lib.tardis_simd_width.restype = ctypes.c_int
        self.simd_width = lib.tardis_simd_width()
        check = lib.tardis_check_meta
        check.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
        check.restype = ctypes.c_int
        self._check = check
        predict = lib.tardis_guard_predict
        predict.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_int]
        predict.restype = ctypes.c_int
        self._predict = predict

    def ffn(self, x: torch.Tensor, y: torch.Tensor, tokens: int, weights: torch.Tensor, guard: torch.Tensor,
            floats: torch.Tensor, meta: torch.Tensor, counters: torch.Tensor | None = None) -> None:
        """y = the FFN of x: (..., features) tensors of ``tokens`` rows, contiguous, in the pack's
        dtype. Raises ValueError if the buffers do not form a valid pack (the kernel checks before
        it reads anything)."""
        status = self._ffn(x.data_ptr(), y.data_ptr(), weights.data_ptr(), guard.data_ptr(), floats.data_ptr(),
                           meta.data_ptr(), tokens, x.shape[-1], weights.numel(), guard.numel(), floats.numel(),
                           torch.get_num_threads(), counters.data_ptr() if counters is not None else None)
        if status:
            raise ValueError(f"tardis kernel refused the call: {_ERRORS.get(status, status)}")

    def guard_predict(self, x: torch.Tensor, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor,
                      meta: torch.Tensor, rows: int) -> torch.Tensor:
        """A low-bit guard's (tokens, rows) float32 predictions for x (tokens, d_in), contiguous in
        the pack's dtype: the batched path's flags, with this kernel's arithmetic."""
        out = torch.empty(x.shape[0], rows)
        status = self._predict(x.data_ptr(), out.data_ptr(), guard.data_ptr(), meta.data_ptr(), x.shape[0],
                               x.shape[1], weights.numel(), guard.numel(), floats.numel(), torch.get_num_threads())
        if status:
            raise ValueError(f"tardis kernel refused to run the guard: {_ERRORS.get(status, status)}")
        return out

    def check(self, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor, meta: torch.Tensor) -> str | None:
        """None if the buffers form a valid pack for the kernel, else what is wrong."""
        status = self._check(meta.data_ptr(), weights.numel(), guard.numel(), floats.numel())
        return _ERRORS.get(status, str(status)) if status else None


@functools.cache
def _load() -> FusedKernel | str:
    if os.environ.get("TARDIS_KERNEL", "").lower() in ("0", "off", "false", "no"):
        return "disabled by TARDIS_KERNEL=off"
    try:
        path = str(library_path())
        lib = ctypes.CDLL(path)
    except (KernelUnavailable, OSError) as exc:
        log.warning("tardis: the fused CPU kernel is unavailable, FFNs run the slower torch path: %s", exc)
        return f"unavailable: {exc}".splitlines()[0]
    lib.tardis_meta_layout.restype = ctypes.c_char_p
    lib.tardis_layout_version.restype = ctypes.c_int64
    fields = lib.tardis_meta_layout().decode().split(",")
    if tuple(fields) != META_FIELDS or lib.tardis_layout_version() != LAYOUT_VERSION:
        return f"unavailable: {path} has another pack layout than this package"
    return FusedKernel(lib, path)


def kernel() -> FusedKernel | None:
    """The fused kernel, built and loaded on first call; None where it cannot run.

    Example:
        >>> k = kernel()
        >>> k is None or k.simd_width in (1, 16)
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
        isa = "AVX-512" if loaded.simd_width == 16 else "portable C++"
        return f"fused CPU kernel ({isa}, {torch.get_num_threads()} threads)"
    return f"torch path: the fused CPU kernel is {loaded}"


def reset() -> None:
    """Forget the load result (tests that change TARDIS_KERNEL or the cache directory)."""
    _load.cache_clear()
