"""Partial constant folding at run time, memoised on the weights' identity and version.

Folded weights are never baked into a graph: dynamo reuses a compiled graph for another instance
of the same module class, and an in-place weight update does not recompile (DESIGN section 3). The
fused op instead folds from the weights it receives and caches the result. A hit must be cheap
(it is checked on every call, at batch 1): the op receives the same Parameter objects each call,
so the fast check is "same live objects (weak references), same ``_version``" (~1 us). Only when
the objects differ do we compare ``(data_ptr, _version, shape, stride, dtype)`` plus a 16-element
content fingerprint, so a new model allocated where a freed one lived (same pointer, version 0)
is not mistaken for it. Updates made through ``.data`` bypass version counters: call
``tardis_compiler.clear_caches()`` after those.
"""
from __future__ import annotations

import collections
import dataclasses
import weakref

import torch

from ..config import LOW_BIT_GUARDS
from .guard import LowBitGuard
from .svd_predictor import SVDPredictor

_MAX_ENTRIES = 1024


@dataclasses.dataclass
class FoldedFFN:
    """What one FFN's fast path needs: the folded affine map, the guard's low-bit W1, and W1/W2
    in neuron-major layout with each neuron's row contiguous (the weights themselves when they
    already are; else a copy: gathering k neurons from a column-major matrix touches nearly
    every cache line of it, i.e. costs a dense read, see runtime/correction.py)."""

    weight: torch.Tensor | None  # Wf = W2 diag(a) W1, (d_out, d_in), in the model dtype; None if a = c = 0
    bias: torch.Tensor | None  # bf = W2 (a * b1 + c) + b2, (d_out,)
    guard: LowBitGuard | SVDPredictor | None  # over the guarded W1 rows, in ``guarded`` order
    w1_rows: torch.Tensor  # (m, d_in), rows contiguous
    w2_rows: torch.Tensor  # (m, d_out), rows contiguous
    always: torch.Tensor | None = None  # (k_a,) long: neurons always computed exactly
    guarded: torch.Tensor | None = None  # (k_g,) long: neurons the guard watches


@dataclasses.dataclass
class FoldedGatedFFN:
    """What one gated FFN's fast path needs (see runtime/gated_ops.py): the folded affine map
    ``W_d diag(c) W_u`` (None when every constant is zero), which neurons are always exact and
    which are guarded, the guard's low-bit copy of the guarded gate rows, and W_d neuron-major."""

    weight: torch.Tensor | None  # (d_out, d_in)
    bias: torch.Tensor | None  # W_d (c * b_u) + b_d, (d_out,)
    always: torch.Tensor  # (k_a,) long: neurons always computed exactly
    guarded: torch.Tensor  # (k_g,) long: neurons the guard watches
    guard: LowBitGuard | SVDPredictor | None  # over the guarded gate rows, in ``guarded`` order
    wd_rows: torch.Tensor  # (m, d_out), rows contiguous


def split_params(params: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An op's calibration tensor as its (6, m) per-neuron rows and, with the "svd" guard, the
    predictor rows (r, m + d_in) below them: ``[Q^T | P]`` of ``SVDPredictor``.

    Example:
        >>> rows, predictor = split_params(torch.zeros(6, 8), 8)
        >>> rows.shape, predictor
        (torch.Size([6, 8]), None)
    """
    if params.shape[0] == 6:
        return params, None
    return params[:6, :m], params[6:]


def build_guard(guard: str, w_rows: torch.Tensor, guarded: torch.Tensor, group_size: int,
                predictor_rows: torch.Tensor | None) -> LowBitGuard | SVDPredictor | None:
    """The guard's predictor over the ``guarded`` neurons only (None if it watches none).

    Example:
        >>> build_guard("int8", torch.randn(32, 64), torch.arange(16), 64, None).kernel
        'int8pack'
    """
    if not guarded.numel():
        return None
    if guard in LOW_BIT_GUARDS:
        rows = w_rows if guarded.numel() == w_rows.shape[0] else w_rows.index_select(0, guarded)
        return LowBitGuard.build(rows, LOW_BIT_GUARDS[guard], group_size)
    if guard == "svd":
        if predictor_rows is None:
            raise ValueError("guard 'svd' needs the factors calibration stores in the profile: "
                             "calibrate with guard='svd' and a budget")
        m = w_rows.shape[0]
        return SVDPredictor(P=predictor_rows[:, m:].contiguous(),
                            Q=predictor_rows[:, :m].index_select(1, guarded).t().contiguous())
    return None


def rows_contiguous(w: torch.Tensor) -> torch.Tensor:
    """``w`` if each row is contiguous, else a row-major copy."""
    return w if w.stride(-1) == 1 else w.contiguous()


def neuron_major(w: torch.Tensor, layout: str) -> torch.Tensor:
    """View a weight as (neurons, features): nn.Linear W1 is already so, Conv1D's is transposed.

    For W1 the neurons are its outputs; for W2 its inputs, so call this with the *flipped* layout
    for W2 (see ``w2_neuron_major``).
    """
    return w if layout == "out_in" else w.t()


def w2_neuron_major(w2: torch.Tensor, layout: str) -> torch.Tensor:
    """W2 as (m, d_out): neurons are W2's input features."""
    return w2.t() if layout == "out_in" else w2


def fold_ffn(
    w1_rows: torch.Tensor,
    b1: torch.Tensor | None,
    w2_rows: torch.Tensor,
    b2: torch.Tensor | None,
    slope: torch.Tensor,
    intercept: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``y = W2 (a * (W1 x + b1) + c) + b2`` into ``Wf x + bf`` (computed in float32 or wider).

    Example:
        >>> w1, w2 = torch.randn(6, 4), torch.randn(6, 3)   # neuron-major
        >>> a, c = torch.rand(6), torch.rand(6)
        >>> wf, bf = fold_ffn(w1, None, w2, None, a, c)
        >>> x = torch.randn(4)
        >>> torch.allclose(wf @ x + bf, w2.t() @ (a * (w1 @ x) + c), atol=1e-5)
        True
    """
    compute = torch.float64 if w1_rows.dtype == torch.float64 else torch.float32
    w1 = w1_rows.to(compute)
    w2 = w2_rows.to(compute)
    a = slope.to(compute)
    c = intercept.to(compute)
    weight = w2.t() @ (a[:, None] * w1)
    shift = a * b1.to(compute) + c if b1 is not None else c
    bias = w2.t() @ shift
    if b2 is not None:
        bias = bias + b2.to(compute)
    return weight.to(w1_rows.dtype), bias.to(w1_rows.dtype)


class FoldCache:
    """LRU cache of folds (``FoldedFFN``, ``FoldedGatedFFN``) keyed on (FFN name, weight and
    calibration pointers); validated on every hit."""

    def __init__(self, max_entries: int = _MAX_ENTRIES) -> None:
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self.max_entries = max_entries
        self.builds = 0  # how many folds were computed (tests assert reuse and invalidation)

    def get(self, name: str, tensors: dict[str, torch.Tensor | None], build):
        """Return the cached fold for ``tensors`` (the op's inputs) or call ``build()`` and cache it."""
        # The calibration tensor is part of the slot: two profiles of one model (two compiled
        # variants, a sweep) must not evict each other's folds on every alternation.
        slot = (name, *(t.data_ptr() if t is not None else 0 for t in tensors.values()))
        values = tuple(tensors.values())
        entry = self._entries.get(slot)
        if entry is not None and (entry.same_objects(values) or entry.same_contents(values)):
            self._entries.move_to_end(slot)
            return entry.value
        entry = _Entry(values, build())
        self.builds += 1
        self._entries[slot] = entry
        self._entries.move_to_end(slot)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry.value

    def clear(self) -> None:
        """Drop every cached fold."""
        self._entries.clear()


class _Entry:
    """A cached fold and what it was built from: weak references (fast check) and identities."""

    def __init__(self, tensors: tuple, value: FoldedFFN) -> None:
        self.value = value
        self._remember(tensors)

    def _remember(self, tensors: tuple) -> None:
        self.refs = tuple(weakref.ref(t) if t is not None else None for t in tensors)
        self.versions = tuple(_version(t) for t in tensors)
        self.identity = tuple(_identity(t) for t in tensors)

    def same_objects(self, tensors: tuple) -> bool:
        for ref, version, t in zip(self.refs, self.versions, tensors):
            if t is None:
                if ref is not None:
                    return False
            elif ref is None or ref() is not t or _version(t) != version:
                return False
        return True

    def same_contents(self, tensors: tuple) -> bool:
        if tuple(_identity(t) for t in tensors) != self.identity:
            return False
        self._remember(tensors)  # other objects over the same weights: check them fast next time
        return True


def _version(t: torch.Tensor | None) -> int:
    if t is None:
        return 0
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter; the fingerprint still helps
        return -1


def _identity(t: torch.Tensor | None):
    if t is None:
        return None
    return (t.data_ptr(), _version(t), tuple(t.shape), t.stride(), t.dtype, t.device, _fingerprint(t))


def _fingerprint(t: torch.Tensor) -> tuple:
    # 16 elements spread over the tensor, read without copying it. Skipped off CPU, where reading
    # them would synchronise the device.
    if t.device.type != "cpu" or t.numel() == 0:
        return ()
    picks = [torch.linspace(0, n - 1, 16).long() for n in t.shape]
    return tuple(t[tuple(picks)].tolist()) if picks else (t.item(),)


FOLD_CACHE = FoldCache()


def clear_caches() -> None:
    """Forget every folded weight (needed only after weight edits that bypass ``_version``).

    Example:
        >>> import tardis_compiler
        >>> tardis_compiler.clear_caches()
    """
    FOLD_CACHE.clear()
