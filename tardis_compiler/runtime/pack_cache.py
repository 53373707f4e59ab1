"""Packs built from a model's live weights, cached for as long as those weights live.

The backend's graphs take the weights themselves as inputs (dynamo reuses one graph for every
instance of a module class, and an in-place weight update does not recompile: DESIGN section 3),
so the pack of each FFN is looked up from the weights a graph is called with. An entry is keyed by
the weight tensors' identities and the calibration and guard that shape it, and it is valid while
every one of those tensors is the same live object at the same ``_version``. It holds only weak
references to them: a model that is deleted takes its packs with it, and a new tensor at a freed
address can never be mistaken for the old one (the key's object is dead and its entry gone).

Tensors made under ``torch.inference_mode()`` carry no version counter: for them (on the CPU) a
fingerprint of 16 elements spread over the tensor stands in for the version, checked on every
call, so edits that change any of those elements are seen. An edit that leaves all 16 unchanged,
an edit of such a tensor on a GPU (reading elements there would synchronise the device), and any
edit through ``.data`` are not: call ``tardis_compiler.clear_caches()`` after those.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Sequence

import torch

from .pack import FFNPack


def tensor_version(t: torch.Tensor | None) -> int | tuple:
    """``t._version``; for a tensor without a version counter (an inference tensor) a fingerprint
    of its values on the CPU, -1 elsewhere; 0 for None.

    Example:
        >>> tensor_version(torch.zeros(3))
        0
        >>> with torch.inference_mode():
        ...     t = torch.zeros(3)
        >>> tensor_version(t)
        (0.0, 0.0, 0.0)
    """
    if t is None:
        return 0
    try:
        return t._version
    except RuntimeError:
        return _fingerprint(t)


def _fingerprint(t: torch.Tensor) -> tuple | int:
    if t.device.type != "cpu" or t.numel() == 0:
        return -1
    flat = t.reshape(-1)
    step = max(1, flat.numel() // 16)
    return tuple(flat[::step][:16].tolist())


class _Entry:
    __slots__ = ("refs", "versions", "source", "pack")

    def __init__(self, tensors: Sequence[torch.Tensor | None], source: object, pack: FFNPack) -> None:
        self.refs = tuple(weakref.ref(t) if t is not None else None for t in tensors)
        self.versions = tuple(tensor_version(t) for t in tensors)
        self.source = weakref.ref(source)
        self.pack = pack

    def matches(self, tensors: Sequence[torch.Tensor | None], source: object) -> bool:
        if self.source() is not source:
            return False
        for ref, version, t in zip(self.refs, self.versions, tensors):
            if (ref() if ref is not None else None) is not t or tensor_version(t) != version:
                return False
        return True


class PackCache:
    """FFN packs keyed by (live weight tensors, calibration object, options key); thread-safe.

    Example:
        >>> from tardis_compiler.runtime.pack import build_pack, guard_all_params
        >>> w = {"w1_rows": torch.randn(16, 8), "b1": None, "w2_rows": torch.randn(16, 8), "b2": None}
        >>> params = guard_all_params(16)
        >>> cache = PackCache()
        >>> build = lambda: build_pack("plain", w, params, "all", "relu", 64)
        >>> cache.get([w["w1_rows"], w["w2_rows"]], params, "all", build) is cache.get(
        ...     [w["w1_rows"], w["w2_rows"]], params, "all", build)
        True
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, _Entry] = {}
        self._lock = threading.Lock()
        self.builds = 0  # how many packs were built (tests assert reuse and invalidation)

    def get(self, tensors: Sequence[torch.Tensor | None], source: object, options: tuple | str,
            build: Callable[[], FFNPack]) -> FFNPack:
        """The pack for ``tensors`` (the FFN's weights, the first one not None) calibrated by
        ``source`` (a live object, compared by identity) with ``options``; built by ``build()`` if
        absent or stale."""
        key = (id(tensors[0]), id(source), options)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.matches(tensors, source):
                return entry.pack
        pack = build()
        with self._lock:
            self.builds += 1
            new_key = key not in self._entries
            self._entries[key] = _Entry(tensors, source, pack)
        if new_key:  # forget the key once its first weight or its calibration is gone
            for obj in (tensors[0], source):
                weakref.finalize(obj, self._drop, key)
        return pack

    def _drop(self, key: tuple) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every pack."""
        with self._lock:
            self._entries.clear()


PACK_CACHE = PackCache()
