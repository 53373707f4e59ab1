"""``TardisFFN``: a compressed FFN as an ``nn.Module``, the module-swap front door to the one runtime.

``compress_`` (``tardis_compiler/compress.py``) replaces an FFN's modules by a ``TardisFFN`` that
holds its pack (``runtime/pack.py``) as buffers and calls the same ``tardis::ffn`` op the backend's
graph rewrite emits. The pack keeps only what inference reads: the folded matrix, the guard, and
the bundles of the neurons that can take the exact path. The rows of folded-unguarded and dropped
neurons are gone, so a compressed model holds less than the dense one.

``dense_key`` keeps an empty (0-element) tensor under the name of the dense FFN's first weight
(its path below this module; "" for this module's own ``weight``): a checkpoint loaded into the dense
architecture without tardis_compiler then fails loudly on that size mismatch, rather than running
with randomly initialised FFNs.

Calls of more than ``dense_above`` tokens (prefill, batches) leave the guarded paths, as the
backend's graphs do (``ffn_op``): with ``keep_dense`` (``compress_(..., keep_dense=True)``) the
module also keeps the FFN's own linears (``dense_ffn.w0, b0, w1, ...`` in ``nn.Linear`` layout, the
kind's order) and runs those calls through them, at the price of holding the dense weights beside
the pack (off by default: memory is the point); without them, a pack whose bundles are in the
model's dtype runs every bundled neuron exactly (the dense FFN's cost, no extra memory).
``dense_above="auto"`` (``compress_``'s default) stays "auto" in the module and its checkpoint and
is resolved at each call (``ffn_op.dense_above_for``: the measured crossover for the dtype and the
threads the call runs on), so one checkpoint serves a 2-thread transformers process and vLLM's
one-thread worker. A checkpoint written before the threshold was recorded for modules without
dense weights loads with -1 (every call through the guarded paths), as it ran then.

A pack is laid out for one dtype (its bundle stride depends on the element size), so ``.to(dtype)``
leaves the buffers' dtypes alone (devices still move): call the model in the dtype it was
compressed in, or compress it again from the dense model in the new dtype.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from .ffn_op import dense_above_for
from .ffn_op import ffn as run_ffn  # also registers torch.ops.tardis.ffn
from .layout import PACK_DTYPES, Layout
from .pack import FFNPack
from .validate import PACK_TENSORS, PackError, compute_dtype, pack_digest, validate_pack

#: Version of ``TardisFFN.spec()``; a checkpoint written with another is refused with a clear error.
SPEC_VERSION = 2  # 2: the layout's ``bundles`` (int8 bundles)
DENSE_MODULE = "dense_ffn"  # the child holding the FFN's own linears (keep_dense)
_BUFFER_NAMES = {*PACK_TENSORS, DENSE_MODULE}
_SPEC_KEYS = {"spec_version", "name", "layout", "dense_key", "sha256", "dense", "dense_above"}
_DENSE_SPEC_KEYS = {"biases", "dense_above", "sha256"}
_DENSE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,7}")


class _Tombstone(torch.nn.Module):
    """Holds a ``dense_key`` mark (see the module docstring)."""


class _DenseLinears(torch.nn.Module):
    """Holds the FFN's own linears for ``keep_dense`` (buffers w0, b0, w1, ...)."""


class TardisFFN(torch.nn.Module):
    """One FFN compressed to its pack: ``forward(x)`` is ``torch.ops.tardis.ffn`` on the buffers.

    Example:
        >>> from tardis_compiler.runtime.pack import build_pack, guard_all_params, dense_reference
        >>> w = {"w1_rows": torch.randn(16, 8), "b1": None, "w2_rows": torch.randn(16, 8), "b2": None}
        >>> module = TardisFFN.from_pack("mlp", build_pack("plain", w, guard_all_params(16), "all", "relu", 64))
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(module(x), dense_reference("plain", w, torch.relu, x), atol=1e-5)
        True
        >>> TardisFFN.empty(module.spec()).weights.shape == module.weights.shape
        True
    """

    def __init__(self, name: str, layout: Layout, device: torch.device | str | None = None,
                 dense_key: str | None = None, dense_biases: tuple[bool, ...] | None = None,
                 dense_above: int | str = -1) -> None:
        super().__init__()
        self.name, self.layout, self.dense_key = name, layout, dense_key
        # keep_dense: which of the FFN's linears have a bias (None: no dense weights kept)
        self.dense_biases, self.dense_above = dense_biases, dense_above
        compute = compute_dtype(layout.dtype)
        self.register_buffer("weights", torch.zeros(layout.n_weights, dtype=layout.dtype, device=device))
        self.register_buffer("guard", torch.zeros(layout.n_guard, dtype=torch.uint8, device=device))
        self.register_buffer("floats", torch.zeros(layout.n_floats, dtype=compute, device=device))
        self.register_buffer("meta", layout.meta())  # on the CPU: the op reads it without a device sync
        self.register_buffer("neurons", torch.zeros(layout.k_bundles, dtype=torch.int64, device=device))
        if dense_key is not None:
            owner = self
            for part in filter(None, dense_key.split(".")):
                child = owner._modules.get(part) or _Tombstone()
                owner.add_module(part, child)
                owner = child
            owner.register_buffer("weight", torch.zeros(0, dtype=layout.dtype, device=device))
        if dense_biases is not None:
            holder = _DenseLinears()
            for i, shape in enumerate(layout.linear_shapes()):
                holder.register_buffer(f"w{i}", torch.zeros(shape, dtype=layout.dtype, device=device))
                if dense_biases[i]:
                    holder.register_buffer(f"b{i}", torch.zeros(shape[0], dtype=layout.dtype, device=device))
            self.add_module(DENSE_MODULE, holder)

    @classmethod
    def from_pack(cls, name: str, pack: FFNPack, dense_key: str | None = None,
                  dense: list[torch.Tensor | None] | None = None, dense_above: int | str = -1) -> "TardisFFN":
        """The module holding ``pack`` (its tensors, not copies), once ``validate_pack`` passes it;
        with ``dense`` (the FFN's linears, weight then bias each, ``nn.Linear`` layout, the kind's
        order) it also keeps them and runs calls of more than ``dense_above`` tokens through them (an int,
        or "auto": ``dense_threshold``)."""
        validate_pack(*pack.tensors(), pack.neurons, pack.activation, pack.layout.dtype, expected=pack.layout,
                      where=f"tardis module {name}")
        biases = None
        if dense is not None:
            shapes = pack.layout.linear_shapes()
            if len(dense) != 2 * len(shapes) or any(tuple(w.shape) != s for w, s in zip(dense[::2], shapes)):
                raise ValueError(f"tardis module {name}: dense weights must be {len(shapes)} linears of shapes "
                                 f"{shapes}, got {[None if w is None else tuple(w.shape) for w in dense[::2]]}")
            biases = tuple(b is not None for b in dense[1::2])
        module = cls(name, pack.layout, device="meta", dense_key=dense_key, dense_biases=biases,
                     dense_above=dense_above)  # placeholders, replaced below
        if dense is not None:
            holder = module.get_submodule(DENSE_MODULE)
            for i, t in enumerate(dense):
                if t is not None:
                    holder._buffers[f"{'wb'[i % 2]}{i // 2}"] = t.detach().to(pack.layout.dtype).contiguous()
        for key, tensor in zip(("weights", "guard", "floats", "meta", "neurons"), (*pack.tensors(), pack.neurons)):
            setattr(module, key, tensor)
        for mark in module.modules():  # the empty dense_key marks
            if "weight" in mark._buffers:
                mark._buffers["weight"] = torch.zeros(0, dtype=pack.layout.dtype, device=pack.weights.device)
        return module

    @classmethod
    def empty(cls, spec: dict[str, Any], device: torch.device | str | None = None) -> "TardisFFN":
        """A module of the shapes ``spec`` (from ``spec()``) describes, with zero buffers: what a
        checkpoint's weights load into."""
        layout = layout_of_spec(spec)
        dense = dense_of_spec(spec, layout)
        return cls(spec["name"], layout, device=device, dense_key=spec.get("dense_key"),
                   dense_biases=dense["biases"] if dense else None,
                   dense_above=dense["dense_above"] if dense else spec.get("dense_above", -1))

    def spec(self) -> dict[str, Any]:
        """JSON-able description of this module's shapes (no weights), for checkpoints' configs,
        with the sha256 of its buffers (``validate_pack`` checks it when a checkpoint loads)."""
        layout = dataclasses.asdict(self.layout)
        # Not "dtype": transformers rewrites keys of that name anywhere in a config it saves.
        layout["element_type"] = str(layout.pop("dtype")).removeprefix("torch.")
        spec = {"spec_version": SPEC_VERSION, "name": self.name, "layout": layout, "dense_key": self.dense_key,
                "sha256": pack_digest([getattr(self, key) for key in PACK_TENSORS])}
        if self.dense_biases is not None:
            spec["dense"] = {"biases": list(self.dense_biases), "dense_above": self.dense_above,
                             "sha256": pack_digest([t for t in self.dense_weights() if t is not None])}
        else:
            spec["dense_above"] = self.dense_above
        return spec

    def dense_weights(self) -> list[torch.Tensor | None]:
        """The FFN's own linears this module keeps (weight, bias per linear), or [] (keep_dense off)."""
        if self.dense_biases is None:
            return []
        held = self._modules[DENSE_MODULE]._buffers
        return [held.get(f"{kind}{i}") for i in range(len(self.dense_biases)) for kind in "wb"]

    def dense_threshold(self) -> int:
        """Calls of more than this many tokens run the kept dense linears, or without them every bundled
        neuron exactly (``ffn_op``; -1: never): ``dense_above``, with "auto" resolved for the pack's
        dtype and this process's compute threads."""
        if self.dense_above == "auto":
            return dense_above_for(self.layout.dtype, kept_dense=self.dense_biases is not None)
        return self.dense_above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_ffn(x, self, self.name, self.dense_threshold(), self.dense_weights())

    # ``ffn_op.ffn`` takes anything with ``tensors()`` and ``layout``: the module is its own pack.
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights, guard, floats, meta): the op's tensor arguments after x."""
        return self.weights, self.guard, self.floats, self.meta

    @property
    def activation(self) -> str:
        return self.layout.activation

    def resident_bytes(self) -> int:
        """Bytes this module holds (its buffers)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _apply(self, fn, recurse: bool = True):
        # Devices move; dtypes stay (see the module docstring); ``meta`` stays on the CPU.
        for module in self.modules():
            for key, tensor in module._buffers.items():
                if tensor is None or (module is self and key == "meta"):
                    continue
                moved = fn(tensor)
                module._buffers[key] = moved if moved.dtype == tensor.dtype else tensor.to(moved.device)
        return self

    def extra_repr(self) -> str:
        lay = self.layout
        kept = f", dense kept (dense_above={self.dense_above})" if self.dense_biases is not None else ""
        return (f"{self.name!r}, {lay.kind}, {lay.activation}, d_in={lay.d_in}, d_out={lay.d_out}, m={lay.m}, "
                f"guarded={lay.k_guard}, exact={lay.k_always}, guard={lay.guard}, {lay.dtype}{kept}")


def dense_of_spec(spec: dict[str, Any], layout: Layout) -> dict[str, Any] | None:
    """The checked ``dense`` entry of a module spec (keep_dense: biases, dense_above, sha256), or
    None; ValueError naming what is wrong (the spec comes from an untrusted config.json).

    Example:
        >>> lay = Layout("plain", "relu", torch.float32, 8, 8, 16, 0, 16, "none", 64, 0, False)
        >>> dense_of_spec({"dense": {"biases": [True, False], "dense_above": 4, "sha256": "0" * 64}}, lay)["biases"]
        (True, False)
    """
    dense = spec.get("dense")
    if dense is None:
        return None
    n = len(layout.linear_shapes())
    if not isinstance(dense, dict) or set(dense) != _DENSE_SPEC_KEYS:
        raise ValueError(f"tardis FFN spec 'dense' must be an object with keys {sorted(_DENSE_SPEC_KEYS)}")
    biases, above = dense["biases"], dense["dense_above"]
    if not isinstance(biases, list) or len(biases) != n or not all(isinstance(b, bool) for b in biases):
        raise ValueError(f"tardis FFN spec 'dense.biases' must be {n} booleans, got {biases!r}")
    check_dense_above(above, "dense.dense_above")
    if not (isinstance(dense["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", dense["sha256"])):
        raise ValueError("tardis FFN spec 'dense.sha256' must be 64 hex digits")
    return {"biases": tuple(biases), "dense_above": above, "sha256": dense["sha256"]}


def check_dense_above(value: Any, field: str = "dense_above") -> None:
    """ValueError unless ``value`` is a ``dense_above``: "auto" or an integer >= -1.

    Example:
        >>> check_dense_above("auto"), check_dense_above(-1)
        (None, None)
    """
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < -1):
        raise ValueError(f"tardis FFN spec {field!r} must be \"auto\" or an integer >= -1, got {value!r}")


def layout_of_spec(spec: Any) -> Layout:
    """The ``Layout`` a module spec (``TardisFFN.spec()``, from an untrusted config.json) describes;
    ValueError naming the field that is missing, unknown or out of range.

    Example:
        >>> lay = Layout("plain", "relu", torch.float32, 8, 8, 16, 0, 16, "none", 64, 0, False)
        >>> spec = {"spec_version": SPEC_VERSION, "name": "mlp", "dense_key": None, "layout": {
        ...     **{k: v for k, v in dataclasses.asdict(lay).items() if k != "dtype"}, "element_type": "float32"}}
        >>> layout_of_spec(spec) == lay
        True
    """
    if not isinstance(spec, dict):
        raise ValueError(f"a tardis FFN spec must be a JSON object, got {type(spec).__name__}")
    if spec.get("spec_version") != SPEC_VERSION:
        raise ValueError(f"tardis FFN spec version {spec.get('spec_version')!r}; this tardis_compiler reads "
                         f"{SPEC_VERSION}: upgrade tardis_compiler, or compress the dense model again")
    unknown = sorted(set(spec) - _SPEC_KEYS)
    if unknown:
        raise ValueError(f"tardis FFN spec has unknown keys {unknown}")
    if not isinstance(spec.get("name"), str):
        raise ValueError(f"tardis FFN spec 'name' must be a string, got {spec.get('name')!r}")
    dense_key = spec.get("dense_key")
    if dense_key not in (None, "") and (not isinstance(dense_key, str) or not _DENSE_KEY.fullmatch(dense_key)
                                        or dense_key.split(".")[0] in _BUFFER_NAMES):
        raise ValueError(f"tardis FFN spec 'dense_key' {dense_key!r} is not a module path below the FFN")
    if "dense_above" in spec:
        if "dense" in spec:
            raise ValueError("tardis FFN spec has both 'dense' and 'dense_above': a module keeping dense weights "
                             "records its threshold in 'dense.dense_above' only")
        check_dense_above(spec["dense_above"])
    if "sha256" in spec and not (isinstance(spec["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", spec["sha256"])):
        raise ValueError("tardis FFN spec 'sha256' must be 64 hex digits")
    values = spec.get("layout")
    fields = {f.name for f in dataclasses.fields(Layout)} - {"dtype"}
    if not isinstance(values, dict):
        raise ValueError("tardis FFN spec has no 'layout' object")
    missing, unknown = sorted(fields - set(values) - {"bundles", "weights"}), sorted(set(values) - fields - {"element_type"})
    if missing or unknown:
        raise ValueError(f"tardis FFN spec layout: missing fields {missing}, unknown fields {unknown}")
    if values.get("element_type") not in PACK_DTYPES:
        raise ValueError(f"tardis FFN spec layout 'element_type' must be one of {sorted(PACK_DTYPES)}, got "
                         f"{values.get('element_type')!r}")
    kwargs = {k: v for k, v in values.items() if k != "element_type"}
    return Layout(dtype=PACK_DTYPES[values["element_type"]], **kwargs)



def check_dense_weights(module: TardisFFN, spec: dict[str, Any], where: str) -> None:
    """After a checkpoint loads: the dense linears a ``keep_dense`` module holds are finite and are
    the bytes whose sha256 its spec records; PackError otherwise (nothing to check without them).

    Example:
        >>> # check_dense_weights(module, swap["ffn"], "tardis module model.layers.0.mlp")
    """
    dense = dense_of_spec(spec, module.layout)
    if dense is None:
        return
    held = [t for t in module.dense_weights() if t is not None]
    for t in held:
        if not bool(torch.isfinite(t).all()):
            raise PackError(f"{where}: its kept dense weights hold NaN or Inf: the checkpoint is corrupt")
    if pack_digest(held) != dense["sha256"]:
        raise PackError(f"{where}: its kept dense weights differ from the sha256 recorded when it was saved: the "
                        "file is corrupt or was changed; download or compress it again")
