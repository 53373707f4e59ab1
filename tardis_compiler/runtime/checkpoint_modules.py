"""The checks every door runs on a tardis checkpoint's compressed FFNs (transformers-free).

A checkpoint is untrusted input. Its ``quantization_config`` (config.json) says which modules became
what; its safetensors files hold the packs. Two doors load it, and both run these functions, in
this order:

1. ``check_config(raw)``: the top-level keys and ``format_version``.
2. ``plan_modules(model, modules, stored, wanted)``, against the *dense* model (any device, the meta
   device included) before anything is allocated or replaced: each entry's spec gives a layout
   (``layout_of_spec``), in the dtype the model is loaded in; the swap fits the dense module it
   replaces (``validate_swap``); the stored tensors' headers are the ones its layout needs and
   nothing else (``validate_stored_tensors``); no two swaps touch the same module.
3. The door replaces the modules with empty ``TardisFFN``s (``ModulePlan.empty``) and loads the tensors.
4. ``finish_module(name, module, spec, format_version)`` after loading: ``validate_pack`` with the
   recorded sha256, then fresh aligned memory for every buffer.

The transformers door is ``hf/quantizer.py``; the vLLM door is ``tardis_compiler/vllm/``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterable, Mapping

import torch

from .layout import Layout
from .module import TardisFFN, check_dense_weights, dense_of_spec, layout_of_spec
from .validate import PACK_TENSORS, PackError, validate_pack, validate_stored_tensors, validate_swap

log = logging.getLogger("tardis_compiler")

QUANT_METHOD = "tardis"
#: Version of the checkpoint format (``quantization_config``); ``TardisFFN.spec`` has its own.
FORMAT_VERSION = 3  # 2: int8 bundles (pack layout 2); 3: every module's sha256 (required)
#: Older formats this package still reads: 2, whose modules carry no sha256 (their bytes are
#: checked for structure and finiteness only; a load warns).
READABLE_FORMATS = (2, FORMAT_VERSION)
#: Keys of ``quantization_config`` besides the ones ``check_config`` returns.
CONFIG_KEYS = ("quant_method", "format_version", "modules", "linears", "guard", "budget", "bundles", "source")
ALIGN = 64  # bytes: torch's CPU allocations, and what the fused kernel's rows are laid out for

#: key -> (file name, safetensors dtype, shape), as ``stored_tensor_headers`` reads them.
Headers = dict[str, tuple[str, str, tuple[int, ...]]]


@dataclasses.dataclass(frozen=True)
class ModulePlan:
    """One checked config.json entry: the FFN at ``target`` becomes a ``TardisFFN`` of ``spec``
    (whose ``layout`` it is), and the modules ``identities`` become ``nn.Identity``."""

    target: str
    spec: dict[str, Any]
    layout: Layout
    identities: tuple[str, ...]

    def empty(self, device: torch.device | str = "meta") -> TardisFFN:
        """The module the checkpoint's tensors load into (on the meta device: nothing allocated)."""
        return TardisFFN.empty(self.spec, device=device)


def check_config(raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(modules, linears, format_version) of a ``quantization_config`` dict, else ValueError saying
    what to do (upgrade tardis_compiler, compress again).

    Example:
        >>> check_config({"quant_method": "tardis", "format_version": 3, "modules": {}})
        ({}, {}, 3)
        >>> check_config({"format_version": 99, "modules": {}})
        Traceback (most recent call last):
        ...
        ValueError: this checkpoint has tardis format version 99; this tardis_compiler reads [2, 3]: install the tardis_compiler version that wrote it
    """
    modules, linears = raw.get("modules") or {}, raw.get("linears") or {}
    if not isinstance(modules, dict) or not all(isinstance(k, str) for k in modules):
        raise ValueError("tardis quantization_config 'modules' must map module paths to their swaps")
    if not isinstance(linears, dict) or not all(isinstance(k, str) for k in linears):
        raise ValueError("tardis quantization_config 'linears' must map module paths to their specs")
    version = raw.get("format_version", FORMAT_VERSION)
    if version not in READABLE_FORMATS:
        raise ValueError(f"this checkpoint has tardis format version {version!r}; this tardis_compiler "
                         f"reads {list(READABLE_FORMATS)}: install the tardis_compiler version that wrote it")
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown tardis quantization_config keys {unknown}: written by a newer "
                         "tardis_compiler? upgrade it")
    return dict(modules), dict(linears), version


def plan_modules(model: torch.nn.Module, modules: Mapping[str, Any], stored: Headers | None,
                 wanted: torch.dtype | None, others: Iterable[str] = ()) -> dict[str, ModulePlan]:
    """Check every ``modules`` entry (config.json) against the dense ``model`` and the stored tensor
    headers (None: not known), for a model loaded in ``wanted`` (None: any); ``others``: paths other
    swaps replace (quantized linears), which no entry may touch. Nothing is allocated or replaced.

    Example:
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
        >>> plan_modules(torch.nn.ModuleDict({"mlp": mlp}), {"mlp.0": "module"}, None, None)
        Traceback (most recent call last):
        ...
        ValueError: tardis module mlp.0: its config.json entry has no 'ffn' spec
    """
    plans = {}
    for target, swap in modules.items():
        if not isinstance(swap, dict) or not isinstance(swap.get("ffn"), dict):
            raise ValueError(f"tardis module {target}: its config.json entry has no 'ffn' spec")
        try:
            layout = layout_of_spec(swap["ffn"])
            dense = dense_of_spec(swap["ffn"], layout)  # keep_dense: the FFN's own linears are stored too
        except ValueError as exc:
            raise ValueError(f"tardis module {target}: config.json: {exc}") from None
        saved = str(layout.dtype).removeprefix("torch.")
        if wanted is not None and wanted != layout.dtype:
            raise ValueError(f"this tardis checkpoint was compressed in {saved} (its packs are laid out for it); "
                             f"load it with dtype=torch.{saved}, or compress the dense model in {wanted}")
        identities = validate_swap(model, target, swap, layout)
        if stored is not None:
            validate_stored_tensors(stored, target, layout, swap["ffn"].get("dense_key"), identities,
                                    dense["biases"] if dense else None)
        plans[target] = ModulePlan(target, swap["ffn"], layout, tuple(identities))
    check_disjoint({**{t: (t, *p.identities) for t, p in plans.items()}, **{t: (t,) for t in others}})
    return plans


def check_disjoint(paths: Mapping[str, tuple[str, ...]]) -> None:
    """No two swaps may touch the same module, or one inside another (target -> paths it replaces).

    Example:
        >>> check_disjoint({"a.mlp": ("a.mlp",), "a.mlp.fc": ("a.mlp.fc",)})
        Traceback (most recent call last):
        ...
        ValueError: tardis modules a.mlp and a.mlp.fc both replace 'a.mlp.fc' (or modules inside each other): config.json is inconsistent
    """
    owner: dict[str, str] = {}
    for target, group in paths.items():
        for path in group:
            for other, other_target in owner.items():
                if path == other or path.startswith(other + ".") or other.startswith(path + "."):
                    raise ValueError(f"tardis modules {other_target} and {target} both replace {path!r} "
                                     "(or modules inside each other): config.json is inconsistent")
            owner[path] = target


def warn_if_undigested(format_version: int) -> None:
    """Log that a format-2 checkpoint records no sha256 (once per load).

    Example:
        >>> warn_if_undigested(FORMAT_VERSION)
    """
    if format_version < 3:
        log.warning("tardis: this checkpoint (format %d) records no sha256 of its packs: corrupted bytes that are "
                    "still valid values cannot be detected; compress the model again to get one", format_version)


def finish_module(name: str, module: TardisFFN, spec: Mapping[str, Any] | None, format_version: int) -> None:
    """After a checkpoint's tensors loaded into ``module``: ``validate_pack`` it against its layout
    and the sha256 config.json records (required from format 3), then give every buffer fresh,
    aligned memory (tensors read from safetensors may sit at any offset of the file; the kernel's
    vector loops peel differently on unaligned rows: last-bit differences).

    Example:
        >>> from tardis_compiler.runtime.pack import build_pack, guard_all_params
        >>> w = {"w1_rows": torch.randn(16, 8), "b1": None, "w2_rows": torch.randn(16, 8), "b2": None}
        >>> module = TardisFFN.from_pack("mlp", build_pack("plain", w, guard_all_params(16), "all", "relu", 64))
        >>> finish_module("mlp", module, module.spec(), FORMAT_VERSION)
        >>> finish_module("mlp", module, {**module.spec(), "sha256": "0" * 64}, FORMAT_VERSION)
        Traceback (most recent call last):
        ...
        tardis_compiler.runtime.validate.PackError: tardis module mlp: the pack's bytes differ from the sha256 recorded when it was saved: the file is corrupt or was changed; download or compress it again
    """
    where = f"tardis module {name}"
    for key in PACK_TENSORS:
        if getattr(module, key).device.type == "meta":
            raise PackError(f"{where}: tensor {key!r} was not loaded from the checkpoint")
    module.meta = module.meta.cpu()
    digest = (spec or {}).get("sha256")
    validate_pack(*(getattr(module, key) for key in PACK_TENSORS), module.layout.activation, module.layout.dtype,
                  expected=module.layout, digest=digest, where=where)
    if format_version >= 3 and digest is None:
        raise PackError(f"{where}: config.json records no sha256 of its pack (format {FORMAT_VERSION} requires "
                        "one): the checkpoint was edited; compress the model again")
    if any(t is not None and t.device.type == "meta" for t in module.dense_weights()):
        raise PackError(f"{where}: its kept dense weights were not loaded from the checkpoint")
    check_dense_weights(module, dict(spec or {}), where)
    for key in ("weights", "guard", "floats", "neurons"):
        tensor = getattr(module, key)
        if tensor.data_ptr() % ALIGN:
            setattr(module, key, tensor.clone())
    for mark in module.modules():  # the empty dense_key marks: real (0-element) tensors, never meta
        if mark is not module and "weight" in mark._buffers and mark._buffers["weight"].device.type == "meta":
            mark._buffers["weight"] = torch.zeros(0, dtype=module.layout.dtype, device=module.weights.device)


def stored_tensor_headers(files: Any) -> Headers | None:
    """key -> (file name, safetensors dtype, shape) of every tensor in the checkpoint's safetensors
    files, read from their headers only (no tensor is loaded); None when the files are not known
    (weights given another way), or are not safetensors.

    Example:
        >>> stored_tensor_headers(None) is None
        True
    """
    from safetensors import safe_open

    if not files:
        return None
    paths = [str(f) for f in (files if isinstance(files, (list, tuple)) else [files])]
    if not all(p.endswith(".safetensors") for p in paths):
        return None
    headers = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                part = f.get_slice(key)
                headers[key] = (path.rsplit("/", 1)[-1], part.get_dtype(), tuple(part.get_shape()))
    return headers


def dtype_of(value: Any) -> torch.dtype | None:
    """A model config's dtype (a ``torch.dtype`` or its name), None when it names none.

    Example:
        >>> dtype_of("bfloat16"), dtype_of(torch.float32), dtype_of("auto")
        (torch.bfloat16, torch.float32, None)
    """
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and hasattr(torch, value.removeprefix("torch.")):
        dtype = getattr(torch, value.removeprefix("torch."))
        return dtype if isinstance(dtype, torch.dtype) else None
    return None
