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
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .ffn_kind import ffn_kind
from .pack import FFNPack
from .pack_cache import PACK_CACHE, tensor_version

if TYPE_CHECKING:
    from ..plan import FFNPlan

@dataclasses.dataclass(frozen=True)
class FFNSlots:
    """Where one FFN's weights sit among a graph's inputs, and how to view them neuron-major.

    ``slots`` maps the kind's weight names (``FFNKind.slots``: plain w1, b1, w2, b2; gated wg, bg,
    wu, bu, wd, bd) to input positions (None: no such bias). ``layouts``, one per linear, are
    ``"out_in"`` (nn.Linear) or ``"in_out"`` (GPT-2's Conv1D); ``offsets``, one per input linear,
    where its neurons' rows start in a fused weight (None: the whole weight).
    """

    name: str
    kind: str
    activation: str
    slots: dict[str, int | None]
    m: int
    pattern: str = ""
    layouts: tuple[str, ...] = ()  # () : every linear "out_in"
    offsets: tuple[int | None, ...] = ()  # () : no offsets

    @property
    def first_position(self) -> int:
        """The input position of the first linear's weight (what identifies the FFN's weights)."""
        return self.slots[ffn_kind(self.kind).first_slot]

    def tensors(self, values: Sequence[Any]) -> list[torch.Tensor | None]:
        """The FFN's weight tensors among ``values``, in slot order (the pack cache's key)."""
        return [values[self.slots[n]] if self.slots[n] is not None else None for n in ffn_kind(self.kind).slots]

    def weights(self, values: Sequence[Any]) -> dict[str, torch.Tensor | None]:
        """Neuron-major views of the weights (what calibration and ``build_pack`` take); no copy."""
        spec = ffn_kind(self.kind)
        out: dict[str, torch.Tensor | None] = {}
        for i, (row, bias) in enumerate(zip(spec.rows, spec.biases)):
            w = values[self.slots[f"w{spec.letters[i]}"]]
            b_slot = self.slots[f"b{spec.letters[i]}"]
            b = values[b_slot] if b_slot is not None else None
            layout = self.layouts[i] if i < len(self.layouts) else "out_in"
            if i < spec.n_inputs:  # a neuron is a row of an input linear's (out, in) weight
                w = w if layout == "out_in" else w.t()
                offset = self.offsets[i] if i < len(self.offsets) else None
                if offset is not None:
                    w, b = w.narrow(0, offset, self.m), (b.narrow(0, offset, self.m) if b is not None else None)
            else:  # and a column of the output linear's
                w = w.t() if layout == "out_in" else w
            out[row], out[bias] = w, b
        return out


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
        plans: their plans (``plan.FFNPlan``, before calibration: the profile comes with each call),
            which build the packs.
    """

    def __init__(self, ffns: Sequence[FFNSlots], plans: Sequence["FFNPlan"]) -> None:
        self.ffns, self.plans = list(ffns), list(plans)
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
        ffn = self.ffns[i]
        plan = self.plans[i].calibrated(profile.ffns.get(ffn.name))
        if not plan.rewritten:
            raise ValueError(f"tardis: FFN {ffn.name!r} cannot run folded with this calibration: {plan.reason}")
        key = (plan.guard, plan.group_size, plan.bundles, plan.calibration.weights)
        return PACK_CACHE.get(ffn.tensors(args), plan.calibration, key, lambda: plan.build(ffn.weights(args)))

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
