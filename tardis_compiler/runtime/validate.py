"""Pack validation: the one check every door runs before a pack reaches the kernel.

A pack may come from a checkpoint a stranger wrote, so it is untrusted input. ``validate_pack``
checks, before any kernel call and without trusting any field:

* every tensor is there, on one device, 1-D and contiguous, with the dtype and element count its
  layout gives (``meta`` itself: 1-D int64 on the CPU, ``len(META_FIELDS)`` long);
* every ``meta`` field is what ``Layout.meta()`` writes for the shapes and codes it names (kind,
  activation, dtype, guard encoding, sizes, offsets; ``Layout.from_meta``), and those shapes are
  in range (``Layout.__post_init__``);
* the float data is finite (the bands alone may hold +-inf: an unbounded side), and so are the
  guard's scales and svd factors; ``neurons`` are distinct ids below ``m``;
* with ``expected`` (what a checkpoint's config.json says), the layout is that one, and with a
  recorded ``digest``, the bytes are the ones that were saved.

The kernel checks sizes and element types again on every call (``runtime/cpu/ffn_kernel.cpp``),
so a bug on the Python side still cannot become a memory error; this module is where a bad pack
gets a clear error naming the file, the module and the field.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import torch

from ..activations import get_activation_rule
from .ffn_kind import ffn_kind
from .layout import META_FIELDS, Layout, guard_codes_bytes, int4_codes_bytes, int4_row_bytes

#: The tensors of a pack, in the order ``validate_pack`` and ``pack_digest`` take them.
PACK_TENSORS = ("weights", "guard", "floats", "meta", "neurons")


class PackError(ValueError):
    """A pack that must not run: the message names where it came from, the tensor and the field."""


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of a pack's ``floats`` for a model in ``dtype`` (float64 models keep float64).

    Example:
        >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def pack_digest(tensors: Sequence[torch.Tensor]) -> str:
    """sha256 of a pack's tensors (``PACK_TENSORS`` order): their dtypes, shapes and bytes.

    Example:
        >>> a = pack_digest([torch.zeros(2), torch.zeros(1, dtype=torch.uint8)])
        >>> a == pack_digest([torch.zeros(2), torch.zeros(1, dtype=torch.uint8)]), len(a)
        (True, 64)
    """
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def validate_pack(weights: torch.Tensor | None, guard: torch.Tensor | None, floats: torch.Tensor | None,
                  meta: torch.Tensor | None, neurons: torch.Tensor | None, activation: str,
                  dtype: torch.dtype | None = None, *, expected: Layout | None = None, digest: str | None = None,
                  where: str = "tardis pack") -> Layout:
    """The layout of a pack whose every tensor and field is valid, else ``PackError`` (see the
    module docstring). ``dtype``: the model dtype the pack must be for (default: its weights');
    ``where``: how errors name the pack (e.g. "model.layers.0.mlp in model.safetensors").

    Example:
        >>> from tardis_compiler.runtime.pack import build_pack, guard_all_params
        >>> w = {"w1_rows": torch.randn(16, 8), "b1": None, "w2_rows": torch.randn(16, 8), "b2": None}
        >>> pack = build_pack("plain", w, guard_all_params(16), "all", "relu", 64)
        >>> validate_pack(*pack.tensors(), pack.neurons, "relu").k_always
        16
        >>> bad = pack.floats.clone(); bad[0] = float("nan")
        >>> validate_pack(pack.weights, pack.guard, bad, pack.meta, pack.neurons, "relu")
        Traceback (most recent call last):
        ...
        tardis_compiler.runtime.validate.PackError: tardis pack: tensor 'floats' holds NaN in the folded bias (at element 0)
    """
    tensors = dict(zip(PACK_TENSORS, (weights, guard, floats, meta, neurons)))
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise PackError(f"{where}: tensor {name!r} is missing")
        if t.dim() != 1 or not t.is_contiguous():
            raise PackError(f"{where}: tensor {name!r} must be 1-D and contiguous, got shape {tuple(t.shape)}")
    try:
        get_activation_rule(activation)
    except KeyError as exc:
        raise PackError(f"{where}: activation {activation!r} is not a registered rule ({exc})") from None
    if meta.dtype != torch.int64 or meta.device.type != "cpu" or meta.numel() != len(META_FIELDS):
        raise PackError(f"{where}: tensor 'meta' must be {len(META_FIELDS)} int64 on the CPU, got "
                        f"{meta.numel()} {meta.dtype} on {meta.device}")
    dtype = weights.dtype if dtype is None else dtype
    try:
        layout = Layout.from_meta(meta, activation, dtype)
    except ValueError as exc:
        raise PackError(f"{where}: tensor 'meta': {exc}") from None
    if expected is not None and layout != expected:
        differs = [f for f in ("kind", "activation", "dtype", "d_in", "d_out", "m", "k_guard", "k_always", "guard",
                               "group", "rank", "has_wf", "bundles", "weights") if getattr(layout, f) != getattr(expected, f)]
        raise PackError(f"{where}: the pack's meta differs from config.json in {differs}")
    sizes = {"weights": (layout.dtype, layout.n_weights), "guard": (torch.uint8, layout.n_guard),
             "floats": (compute_dtype(layout.dtype), layout.n_floats), "neurons": (torch.int64, layout.k_bundles)}
    for name, (want_dtype, numel) in sizes.items():
        t = tensors[name]
        if t.dtype != want_dtype or t.numel() != numel:
            raise PackError(f"{where}: tensor {name!r} must be {numel} {want_dtype} for its meta, got "
                            f"{t.numel()} {t.dtype}")
    devices = {t.device for name, t in tensors.items() if name in ("weights", "guard", "floats")}
    if len(devices) != 1:
        raise PackError(f"{where}: the pack's tensors are on several devices {sorted(map(str, devices))}")
    _check_values(layout, weights, guard, floats, neurons, where)
    if digest is not None and pack_digest((weights, guard, floats, meta, neurons)) != digest:
        raise PackError(f"{where}: the pack's bytes differ from the sha256 recorded when it was saved: the file "
                        "is corrupt or was changed; download or compress it again")
    return layout


def _check_values(layout: Layout, weights: torch.Tensor, guard: torch.Tensor, floats: torch.Tensor,
                  neurons: torch.Tensor, where: str) -> None:
    _finite(weights, "weights", where)
    _finite(floats[:layout.off_bands], "floats", where, "the folded bias")
    _not_nan(floats[layout.off_bands:layout.off_neuron], "floats", where, "a guard band", layout.off_bands)
    _finite(floats[layout.off_neuron:], "floats", where, "the per-neuron floats, svd factors or int8 scales",
            layout.off_neuron)
    kg = layout.k_guard
    if layout.guard == "int8":
        _finite(guard[layout.off_gscales:layout.end_gscales].view(torch.float32), "guard", where, "the int8 scales")
    elif layout.guard in ("int4", "int2"):
        _finite(guard[layout.off_gscales:layout.end_gscales].view(torch.bfloat16), "guard", where,
                "the group scales")
    elif layout.guard == "svd":
        codes = kg * guard_codes_bytes("svd", layout.d_in, layout.group, layout.rank)
        _finite(guard[:codes].view(torch.float32), "guard", where, "the svd factors")
    if layout.weights == "int4":
        _check_int4_scales(layout, guard, where)
    if neurons.numel():
        low, high = int(neurons.min()), int(neurons.max())
        if low < 0 or high >= layout.m:
            raise PackError(f"{where}: tensor 'neurons' holds ids outside [0, {layout.m}) (min {low}, max {high})")
        if neurons.unique().numel() != neurons.numel():
            raise PackError(f"{where}: tensor 'neurons' names a neuron twice")


def _check_int4_scales(layout: Layout, guard: torch.Tensor, where: str) -> None:
    """Every int4 row's (scale, minimum) pairs finite, and so its largest value (15 scales above
    the minimum): a crafted pair must not make a weight infinite."""
    regions = []  # (start byte in guard, rows, bytes per row, offset of the int4 row in it, its elements)
    if layout.k_quant_bundles:
        offset = 0
        for length in [layout.d_in] * ffn_kind(layout.kind).n_inputs + [layout.d_out]:
            regions.append((layout.off_qbundles, layout.k_quant_bundles, layout.qstride, offset, length))
            offset += int4_row_bytes(length)
    if layout.quant_wf:
        regions.append((layout.off_qwf, layout.d_out, layout.qwf_row_bytes, 0, layout.d_in))
    for start, rows, stride, offset, length in regions:
        table = guard[start:start + rows * stride].view(rows, stride)
        pairs = table[:, offset + int4_codes_bytes(length):offset + int4_row_bytes(length)]
        pairs = pairs.contiguous().view(torch.bfloat16).float().view(rows, -1, 2)
        top = pairs[..., 0].abs() * 15 + pairs[..., 1].abs()
        if not bool(torch.isfinite(top).all()):
            raise PackError(f"{where}: tensor 'guard' holds an int4 group scale or minimum that is NaN, infinite or "
                            "too large for float32: the pack is corrupt")


def _finite(t: torch.Tensor, name: str, where: str, part: str = "", offset: int = 0) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        first = offset + int(bad.nonzero()[0, 0])
        what = "NaN" if bool(t.isnan().any()) else "an infinity"
        raise PackError(f"{where}: tensor {name!r} holds {what}{f' in {part}' if part else ''} (at element {first})")


def _not_nan(t: torch.Tensor, name: str, where: str, part: str, offset: int) -> None:
    bad = t.isnan()
    if bool(bad.any()):
        raise PackError(f"{where}: tensor {name!r} holds NaN in {part} (at element {offset + int(bad.nonzero()[0, 0])})")


# --- a checkpoint's swaps: the config.json entries that say which modules become what --------
#: safetensors' names of the dtypes a pack's tensors have.
_STORED_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                  torch.uint8: "U8", torch.int64: "I64"}


def expected_tensors(target: str, layout: Layout, dense_key: str | None,
                     dense_biases: Sequence[bool] | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor a checkpoint stores for the module at ``target``: key -> (safetensors dtype, shape);
    with ``dense_biases`` (``keep_dense``: which linears have a bias) also the FFN's kept linears.

    Example:
        >>> lay = Layout("plain", "relu", torch.float32, 8, 8, 16, 0, 16, "none", 64, 0, False)
        >>> sorted(expected_tensors("mlp", lay, "fc1"))[:2]
        ['mlp.fc1.weight', 'mlp.floats']
    """
    sizes = {"weights": (layout.dtype, layout.n_weights), "guard": (torch.uint8, layout.n_guard),
             "floats": (compute_dtype(layout.dtype), layout.n_floats), "meta": (torch.int64, len(META_FIELDS)),
             "neurons": (torch.int64, layout.k_bundles)}
    out = {f"{target}.{name}": (_STORED_DTYPES[dtype], (numel,)) for name, (dtype, numel) in sizes.items()}
    if dense_key is not None:  # the empty mark under the dense FFN's first weight (runtime/module.py)
        out[".".join(filter(None, (target, dense_key, "weight")))] = (_STORED_DTYPES[layout.dtype], (0,))
    if dense_biases is not None:  # runtime/module.py: ``dense_ffn.w<i>``, ``b<i>``, nn.Linear layout
        for i, (shape, bias) in enumerate(zip(layout.linear_shapes(), dense_biases)):
            out[f"{target}.dense_ffn.w{i}"] = (_STORED_DTYPES[layout.dtype], shape)
            if bias:
                out[f"{target}.dense_ffn.b{i}"] = (_STORED_DTYPES[layout.dtype], (shape[0],))
    return out


def validate_stored_tensors(stored: dict[str, tuple[str, str, tuple[int, ...]]], target: str, layout: Layout,
                            dense_key: str | None, identities: Sequence[str] = (),
                            dense_biases: Sequence[bool] | None = None) -> None:
    """Check a checkpoint's tensor headers (key -> (file, dtype, shape), read before any tensor is
    allocated) for the module at ``target``: each tensor there with its dtype and shape, nothing
    else stored under the module or the modules it replaces. PackError names the file and tensor.

    Example:
        >>> lay = Layout("plain", "relu", torch.float32, 8, 8, 16, 0, 16, "none", 64, 0, False)
        >>> stored = {k: ("model.safetensors", *v) for k, v in expected_tensors("mlp", lay, None).items()}
        >>> validate_stored_tensors(stored, "mlp", lay, None)
        >>> del stored["mlp.guard"]
        >>> validate_stored_tensors(stored, "mlp", lay, None)
        Traceback (most recent call last):
        ...
        tardis_compiler.runtime.validate.PackError: tardis module mlp: tensor 'mlp.guard' is missing from the checkpoint
    """
    check_stored_headers(stored, expected_tensors(target, layout, dense_key, dense_biases), f"tardis module {target}",
                         "layout", (target, *identities), "a compressed module")


def check_stored_headers(stored: dict[str, tuple[str, str, tuple[int, ...]]],
                         wanted: dict[str, tuple[str, tuple[int, ...]]], what: str, described_by: str,
                         owners: Sequence[str], owner_kind: str) -> None:
    """Every ``wanted`` key (-> (dtype, shape)) stored with that dtype and shape, and nothing else
    stored under the modules ``owners``; PackError names ``what``, the file and the tensor.

    Example:
        >>> check_stored_headers({"m.w": ("f.safetensors", "F32", (2,))}, {"m.w": ("F32", (3,))}, "m", "spec",
        ...                      ["m"], "a module")
        Traceback (most recent call last):
        ...
        tardis_compiler.runtime.validate.PackError: m in f.safetensors: tensor 'm.w' is F32 [2], its config.json spec needs F32 [3]
    """
    for key, (dtype, shape) in wanted.items():
        if key not in stored:
            raise PackError(f"{what}: tensor {key!r} is missing from the checkpoint")
        file, got_dtype, got_shape = stored[key]
        if got_dtype != dtype or tuple(got_shape) != shape:
            raise PackError(f"{what} in {file}: tensor {key!r} is {got_dtype} {list(got_shape)}, "
                            f"its config.json {described_by} needs {dtype} {list(shape)}")
    prefixes = tuple(f"{p}." for p in owners if p)
    extra = sorted(k for k in stored if k.startswith(prefixes) and k not in wanted)
    if extra:
        raise PackError(f"{what} in {stored[extra[0]][0]}: unexpected tensors {extra[:4]} under {owner_kind}")


def validate_swap(model: torch.nn.Module, target: str, swap: object, layout: Layout) -> tuple[str, ...]:
    """Check one config.json swap against the dense model it will be applied to (on any device,
    the meta device included) and return its identities: ``target`` must be the module that holds
    exactly this FFN's weights ("module"), or its first linear ("split", whose identities are the
    activation module and the second linear of the same layer). Anything else (a module path
    outside the FFN, shapes the layout does not describe) is a PackError: applied, it would
    silently replace a part of the model that is not this FFN.

    Example:
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        >>> lay = Layout("plain", "relu", torch.float32, 8, 8, 16, 0, 16, "none", 64, 0, False)
        >>> validate_swap(torch.nn.ModuleDict({"mlp": mlp}), "mlp.0", {"mode": "split",
        ...               "identities": ["mlp.1", "mlp.2"]}, lay)
        ('mlp.1', 'mlp.2')
    """
    if not isinstance(swap, dict) or swap.get("mode") not in ("module", "split"):
        raise PackError(f"tardis module {target}: its config.json entry needs 'mode' 'module' or 'split'")
    identities = swap.get("identities", [])
    if not isinstance(identities, list) or not all(isinstance(i, str) for i in identities):
        raise PackError(f"tardis module {target}: 'identities' must be a list of module paths")
    module = _submodule(model, target, target)
    d_in, d_out, m = layout.d_in, layout.d_out, layout.m
    spec = ffn_kind(layout.kind)
    first = [(m, d_in)] * spec.n_inputs
    if swap["mode"] == "module":
        if identities:
            raise PackError(f"tardis module {target}: a 'module' swap replaces no other module, got {identities}")
        fused = [(spec.n_inputs * m, d_in)] if spec.n_inputs > 1 else None  # the input linears as one
        _check_weights(module, target, [first + [(d_out, m)]] + ([fused + [(d_out, m)]] if fused else []),
                       {m, spec.n_inputs * m, d_out})
        return ()
    if not spec.splittable or len(identities) != 2 or len(set(identities) | {target}) != 3:
        raise PackError(f"tardis module {target}: a 'split' swap is a plain FFN's first linear with two "
                        f"identities (its activation and its second linear), got {layout.kind}, {identities}")
    activation, second = (_submodule(model, target, path) for path in identities)
    for path in identities:
        if _layer(path) != _layer(target):
            raise PackError(f"tardis module {target}: identity {path!r} is not in the FFN's layer")
    if any(True for _ in activation.parameters()) or any(True for _ in activation.buffers()) or \
            any(True for _ in activation.children()):
        raise PackError(f"tardis module {target}: identity {identities[0]!r} is not an activation (it holds "
                        "parameters, buffers or modules)")
    _check_weights(module, target, [first], {m})
    _check_weights(second, identities[1], [[(d_out, m)]], {d_out})
    return tuple(identities)


def _submodule(model: torch.nn.Module, target: str, path: str) -> torch.nn.Module:
    if not path:
        raise PackError(f"tardis module {target}: the model itself cannot be swapped")
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise PackError(f"tardis module {target}: the model has no module {path!r}") from None


def _check_weights(module: torch.nn.Module, name: str, spellings: list[list[tuple[int, int]]],
                   bias_sizes: set[int]) -> None:
    """``module``'s parameters must be one spelling's matrices (either orientation: GPT-2's Conv1D
    stores (in, out)) and biases of the given sizes, nothing else."""
    params = [tuple(p.shape) for p in module.parameters()]
    matrices = sorted(tuple(sorted(s)) for s in params if len(s) == 2)
    others = [s for s in params if len(s) != 2]
    fits = any(matrices == sorted(tuple(sorted(s)) for s in spelling) for spelling in spellings)
    if not fits or any(len(s) != 1 or s[0] not in bias_sizes for s in others):
        # the claim first, the door's own parameter list last (vLLM merges gate and up into one matrix)
        raise PackError(f"tardis module {name}: the model's FFN weights are not the ones config.json describes "
                        f"({spellings[0]}); this model's parameters: {params}")


def _layer(path: str) -> str:
    """The path up to the last numeric part of its parent (the layer index), "" if none:
    "a.3.mlp.fc" -> "a.3", "mlp.0" -> "" (a Sequential's own index is not a layer)."""
    parts = path.split(".")[:-1]
    numeric = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join(parts[:numeric[-1] + 1]) if numeric else ""
