"""Hugging Face checkpoints of compressed models: ``save_pretrained`` / ``from_pretrained``.

``import tardis_compiler`` registers ``TardisConfig`` and ``TardisHfQuantizer`` for
``quant_method: "tardis"``. ``compress_`` attaches a ``TardisConfig`` to a transformers model, so
``model.save_pretrained(dir)`` writes the packs to safetensors and the swaps to ``config.json``'s
``quantization_config``; ``AutoModelForCausalLM.from_pretrained(dir)`` then rebuilds the
``TardisFFN`` and ``nn.Identity`` modules (empty, on the meta device) before the weights load into
them. Nothing is pickled. With ``compress_(..., other_linears=...)``, ``linears`` records the
``QuantizedLinear`` modules (attention projections, the LM head, ...): they are rebuilt the same way,
and checked as the packs are (``runtime/validate_linear.py``). A checkpoint without them has no
``linears`` key, and loads as before.

Without tardis_compiler installed, transformers warns "Unknown quantization type, got tardis" and
tries the dense architecture; each FFN's first weight is stored as an empty tensor
(``TardisFFN.dense_key``), so that load fails loudly on the size mismatch instead of running with
randomly initialised FFNs (tested in tests/hf/test_quantizer.py).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..runtime.module import TardisFFN, layout_of_spec
from ..runtime.quantized_linear import ELEMENT_TYPES, QuantizedLinear
from ..runtime.validate import PACK_TENSORS, PackError, validate_pack, validate_stored_tensors, validate_swap
from ..runtime.validate_linear import (check_spec, validate_linear_target, validate_linear_values,
                                       validate_stored_linear)

log = logging.getLogger("tardis_compiler")

QUANT_METHOD = "tardis"
#: Version of the checkpoint format (``TardisConfig``); ``TardisFFN.spec`` has its own.
FORMAT_VERSION = 3  # 2: int8 bundles (pack layout 2); 3: every module's sha256 (required)
#: Older formats this package still reads: 2, whose modules carry no sha256 (their bytes are
#: checked for structure and finiteness only; a load warns).
READABLE_FORMATS = (2, FORMAT_VERSION)
_ALIGN = 64  # bytes: torch's CPU allocations, and what the fused kernel's rows are laid out for


class TardisConfig(QuantizationConfigMixin):
    """``quantization_config`` of a compressed checkpoint: which modules became what.

    Args:
        modules: module FQN -> {"ffn": ``TardisFFN.spec()``, "mode": "module" | "split",
            "identities": FQNs replaced by ``nn.Identity``}.
        format_version: ``FORMAT_VERSION`` of the writer.
        guard, budget, bundles, source: how it was compressed (for people reading config.json;
            the modules alone rebuild the model).
        linears: module FQN -> {"linear": ``QuantizedLinear.spec()``, "compressed": its report entry}
            (``compress_(other_linears=...)``); absent from config.json when empty.

    Example:
        >>> TardisConfig(modules={}).to_dict()["quant_method"]
        'tardis'
    """

    def __init__(self, modules: dict[str, Any] | None = None, format_version: int = FORMAT_VERSION,
                 guard: str | None = None, budget: float | None = None, bundles: str | None = None,
                 source: str = "", linears: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        if not isinstance(modules or {}, dict) or not all(isinstance(k, str) for k in (modules or {})):
            raise ValueError("tardis quantization_config 'modules' must map module paths to their swaps")
        self.modules = dict(modules or {})
        if not isinstance(linears or {}, dict) or not all(isinstance(k, str) for k in (linears or {})):
            raise ValueError("tardis quantization_config 'linears' must map module paths to their specs")
        self.linears = dict(linears or {})
        self.guard, self.budget, self.bundles, self.source = guard, budget, bundles, source
        if format_version not in READABLE_FORMATS:
            raise ValueError(f"this checkpoint has tardis format version {format_version!r}; this tardis_compiler "
                             f"reads {list(READABLE_FORMATS)}: install the tardis_compiler version that wrote it")
        unknown = sorted(set(kwargs) - {"quant_method"})
        if unknown:
            raise ValueError(f"unknown tardis quantization_config keys {unknown}: written by a newer "
                             "tardis_compiler? upgrade it")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if not out.get("linears"):  # a checkpoint without quantized linears is written as before
            out.pop("linears", None)
        return out


class TardisHfQuantizer(HfQuantizer):
    """Rebuilds a compressed model's modules before its weights load (see the module docstring)."""

    requires_calibration = True  # a dense checkpoint cannot be compressed on load: use compress_

    def __init__(self, quantization_config: TardisConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _process_model_before_weight_loading(self, model: torch.nn.Module, checkpoint_files: Any = None,
                                             **kwargs: Any) -> None:
        # A checkpoint is untrusted input: every swap is checked against the dense model and every
        # stored tensor's header against its layout before anything is allocated or replaced.
        modules = self.quantization_config.modules
        wanted = _dtype_of(getattr(model.config, "dtype", None))
        stored = stored_tensor_headers(checkpoint_files)
        built = {}
        for target, swap in modules.items():
            if not isinstance(swap, dict) or not isinstance(swap.get("ffn"), dict):
                raise ValueError(f"tardis module {target}: its config.json entry has no 'ffn' spec")
            try:
                layout = layout_of_spec(swap["ffn"])
            except ValueError as exc:
                raise ValueError(f"tardis module {target}: config.json: {exc}") from None
            saved = str(layout.dtype).removeprefix("torch.")
            if wanted is not None and wanted != layout.dtype:
                raise ValueError(f"this tardis checkpoint was compressed in {saved} (its packs are laid out for it); "
                                 f"load it with dtype=torch.{saved}, or compress the dense model in {wanted}")
            identities = validate_swap(model, target, swap, layout)
            if stored is not None:
                validate_stored_tensors(stored, target, layout, swap["ffn"].get("dense_key"), identities)
            built[target] = (TardisFFN.empty(swap["ffn"], device="meta"), identities)
        linears = _linear_modules(model, self.quantization_config.linears, stored, wanted)
        _check_disjoint({**{target: (target, *identities) for target, (_, identities) in built.items()},
                         **{target: (target,) for target in linears}})
        for target, (module, identities) in built.items():
            model.set_submodule(target, module)
            for fqn in identities:
                model.set_submodule(fqn, torch.nn.Identity())
        for target, module in linears.items():
            model.set_submodule(target, module)
        model.tardis_swaps = dict(modules)
        model.tardis_linears = dict(self.quantization_config.linears)

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        specs = {target: swap["ffn"] for target, swap in self.quantization_config.modules.items()}
        with_digests = self.quantization_config.format_version >= 3
        if not with_digests:
            log.warning("tardis: this checkpoint (format %d) records no sha256 of its packs: corrupted bytes that are "
                        "still valid values cannot be detected; compress the model again to get one",
                        self.quantization_config.format_version)
        for name, module in model.named_modules():
            if not isinstance(module, TardisFFN):
                continue
            module.meta = module.meta.cpu()
            digest = specs.get(name, {}).get("sha256")
            validate_pack(*(getattr(module, key) for key in PACK_TENSORS), module.layout.activation,
                          module.layout.dtype, expected=module.layout, digest=digest, where=f"tardis module {name}")
            if with_digests and digest is None:
                raise PackError(f"tardis module {name}: config.json records no sha256 of its pack (format "
                                f"{FORMAT_VERSION} requires one): the checkpoint was edited; compress the model again")
            # Tensors read from safetensors may sit at any offset of the file; the kernel's vector
            # loops peel differently on unaligned rows (last-bit differences): give every
            # buffer fresh, aligned memory, as a pack built in memory has.
            for key in ("weights", "guard", "floats", "neurons"):
                tensor = getattr(module, key)
                if tensor.data_ptr() % _ALIGN:
                    setattr(module, key, tensor.clone())
        for name, entry in self.quantization_config.linears.items():
            module = model.get_submodule(name)
            validate_linear_values(module, entry["linear"], f"tardis linear {name}")
            for key, tensor in (*module._buffers.items(), *module._parameters.items()):
                if tensor is not None and tensor.data_ptr() % _ALIGN:  # as the packs: fresh, aligned memory
                    copy = tensor.detach().clone()
                    setattr(module, key, torch.nn.Parameter(copy, requires_grad=False) if key == "bias" else copy)
            module.prepare()
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


def _linear_modules(model: torch.nn.Module, linears: dict[str, Any], stored: Any,
                    wanted: torch.dtype | None) -> dict[str, QuantizedLinear]:
    """The empty ``QuantizedLinear`` of each config.json ``linears`` entry, once its spec, its place in
    the dense model and its stored tensors' headers are checked (nothing allocated before)."""
    out = {}
    for target, entry in linears.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("linear"), dict):
            raise PackError(f"tardis linear {target}: its config.json entry must be an object with a 'linear' spec")
        spec = check_spec(target, entry.get("linear"))
        if wanted is not None and wanted != ELEMENT_TYPES[spec["element_type"]]:
            raise ValueError(f"this tardis checkpoint was compressed in {spec['element_type']} (its quantized linear "
                             f"{target}'s scales are), load it with dtype=torch.{spec['element_type']}")
        validate_linear_target(model, target, spec)
        if stored is not None:
            validate_stored_linear(stored, target, spec)
        out[target] = QuantizedLinear.empty(spec, device="meta")
    return out


def _check_disjoint(paths: dict[str, tuple[str, ...]]) -> None:
    """No two swaps may touch the same module, or one inside another."""
    owner = {}
    for target, group in paths.items():
        for path in group:
            for other, other_target in owner.items():
                if path == other or path.startswith(other + ".") or other.startswith(path + "."):
                    raise ValueError(f"tardis modules {other_target} and {target} both replace {path!r} "
                                     "(or modules inside each other): config.json is inconsistent")
            owner[path] = target


def stored_tensor_headers(files: Any) -> dict[str, tuple[str, str, tuple[int, ...]]] | None:
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


def _dtype_of(value: Any) -> torch.dtype | None:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and hasattr(torch, value.removeprefix("torch.")):
        dtype = getattr(torch, value.removeprefix("torch."))
        return dtype if isinstance(dtype, torch.dtype) else None
    return None


def attach_quantization_config(model: torch.nn.Module, report: Any, profile: Any) -> None:
    """Give a ``compress_``ed transformers model the config and quantizer a loaded one has, so
    ``save_pretrained`` writes a checkpoint ``from_pretrained`` rebuilds. Other models: nothing."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "save_pretrained"):
        return
    previous = getattr(config, "quantization_config", None)
    if previous is not None and getattr(previous, "quant_method", None) not in (None, QUANT_METHOD):
        raise ValueError(f"this model is already quantized with {previous.quant_method!r}; compress the dense model")
    quant = TardisConfig(modules=model.tardis_swaps, guard=report.guard, budget=profile.config.budget,
                         bundles=report.bundles, source=profile.source, linears=getattr(model, "tardis_linears", None))
    config.quantization_config = quant
    model.hf_quantizer = TardisHfQuantizer(quant, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def register() -> None:
    """Register ``"tardis"`` with transformers (once; ``import tardis_compiler`` calls it)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(TardisConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(TardisHfQuantizer)
