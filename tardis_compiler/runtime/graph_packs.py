"""The packs a rewritten graph needs, found per call from the weights it is called with.

A folded graph takes, after its own inputs, four tensors per FFN (``FFNPack.tensors()``). One
compiled graph serves every model instance of a class and every profile, so ``GraphPacks`` looks
them up on each call: a fast path when the graph sees the same weight objects at the same versions
as last time (the decode loop), else ``PACK_CACHE`` per FFN (built on first use).
"""
from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any, Sequence

import torch

from .pack import FFNPack, build_pack
from .pack_cache import PACK_CACHE, tensor_version

_PLAIN_SLOTS = ("w1", "b1", "w2", "b2")
_GATED_SLOTS = ("wg", "bg", "wu", "bu", "wd", "bd")


@dataclasses.dataclass(frozen=True)
class FFNSlots:
    """Where one FFN's weights sit among a graph's inputs, and how to view them neuron-major.

    ``slots`` maps weight names (plain: w1, b1, w2, b2; gated: wg, bg, wu, bu, wd, bd) to input
    positions (None: no such bias). Plain layouts are ``"out_in"`` (nn.Linear) or ``"in_out"``
    (GPT-2's Conv1D); gated FFNs are nn.Linear, with row ``offsets`` into fused gate/up weights.
    """

    name: str
    kind: str
    activation: str
    slots: dict[str, int | None]
    m: int
    pattern: str = ""
    layouts: tuple[str, str] = ("out_in", "out_in")
    offsets: tuple[int, int] = (0, 0)

    def tensors(self, values: Sequence[Any]) -> list[torch.Tensor | None]:
        """The FFN's weight tensors among ``values``, in slot order (the pack cache's key)."""
        names = _GATED_SLOTS if self.kind == "gated" else _PLAIN_SLOTS
        return [values[self.slots[n]] if self.slots[n] is not None else None for n in names]

    def weights(self, values: Sequence[Any]) -> dict[str, torch.Tensor | None]:
        """Neuron-major views of the weights (what calibration and ``build_pack`` take); no copy."""
        get = lambda k: values[self.slots[k]] if self.slots[k] is not None else None  # noqa: E731
        if self.kind == "gated":
            (go, uo), m = self.offsets, self.m
            cut = lambda t, off: t.narrow(0, off, m) if t is not None else None  # noqa: E731
            return {"wg_rows": cut(get("wg"), go), "bg": cut(get("bg"), go), "wu_rows": cut(get("wu"), uo),
                    "bu": cut(get("bu"), uo), "wd_rows": get("wd").t(), "bd": get("bd")}
        l1, l2 = self.layouts
        w1, w2 = get("w1"), get("w2")
        return {"w1_rows": w1 if l1 == "out_in" else w1.t(), "b1": get("b1"),
                "w2_rows": w2.t() if l2 == "out_in" else w2, "b2": get("b2")}


def dummy_pack_inputs(ffns: Sequence[FFNSlots], device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Placeholder pack tensors to compile a folded graph with (the op's output shape depends on
    none of them, and the compiled graph accepts packs of any size)."""
    from .layout import META_FIELDS

    one = [torch.zeros(0, dtype=dtype, device=device), torch.zeros(0, dtype=torch.uint8, device=device),
           torch.zeros(0, device=device), torch.zeros(len(META_FIELDS), dtype=torch.int64, device=device)]
    return [t for _ in ffns for t in one]


class GraphPacks:
    """Finds the packs of a graph's FFNs for the inputs it is called with.

    Args:
        ffns: the folded FFNs, in the order of the graph's extra inputs.
        guards: the guard of each FFN; group_size: the guard's quantization group.
    """

    def __init__(self, ffns: Sequence[FFNSlots], guards: Sequence[str], group_size: int) -> None:
        self.ffns, self.guards, self.group_size = list(ffns), list(guards), group_size
        self._positions = [p for f in self.ffns for p in f.slots.values() if p is not None]
        self._last: tuple | None = None  # (weak refs, versions, profile ref, flat packs)
        self._lock = threading.Lock()
        _INSTANCES.add(self)

    def flat(self, args: Sequence[Any], profile: Any) -> list[torch.Tensor]:
        """Every FFN's four pack tensors, concatenated, for ``args`` calibrated by ``profile``."""
        weights = [args[p] for p in self._positions]
        last = self._last
        if last is not None and last[2]() is profile and _same(last[0], last[1], weights):
            return last[3]
        packs = [self.pack(i, args, profile) for i in range(len(self.ffns))]
        flat = [t for pack in packs for t in pack.tensors()]
        with self._lock:
            self._last = (tuple(weakref.ref(w) for w in weights), tuple(tensor_version(w) for w in weights),
                          weakref.ref(profile), flat)
        return flat

    def pack(self, i: int, args: Sequence[Any], profile: Any) -> FFNPack:
        """The pack of FFN ``i``: cached per (weights, calibration, guard), built on first use."""
        ffn, guard = self.ffns[i], self.guards[i]
        calibration = profile.ffns[ffn.name]

        def build() -> FFNPack:
            params = calibration.params(guard)
            return build_pack(ffn.kind, ffn.weights(args), params, guard, ffn.activation, self.group_size,
                              calibration.fold_term, bundles=bundles, weights_encoding=quantized)

        bundles, quantized = calibration.bundles, calibration.weights  # as calibration priced them
        return PACK_CACHE.get(ffn.tensors(args), calibration, (guard, self.group_size, bundles, quantized), build)

    def forget(self) -> None:
        """Drop the fast path's references (``clear_caches``)."""
        self._last = None


_INSTANCES: "weakref.WeakSet[GraphPacks]" = weakref.WeakSet()


def forget_fast_paths() -> None:
    """Make every live ``GraphPacks`` look its packs up again on its next call."""
    for instance in list(_INSTANCES):
        instance.forget()


def _same(refs: tuple, versions: tuple, weights: list) -> bool:
    if len(refs) != len(weights):
        return False
    for ref, version, w in zip(refs, versions, weights):
        if ref() is not w or tensor_version(w) != version:
            return False
    return True
