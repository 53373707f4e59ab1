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

from typing import Any

import torch
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..runtime.checkpoint_modules import (ALIGN, FORMAT_VERSION, QUANT_METHOD, READABLE_FORMATS, check_config,
                                          check_disjoint, dtype_of, finish_module, plan_modules,
                                          stored_tensor_headers, warn_if_undigested)
from ..runtime.module import TardisFFN
from ..runtime.quantized_linear import ELEMENT_TYPES, QuantizedLinear
from ..runtime.validate import PackError
from ..runtime.validate_linear import (check_spec, validate_linear_target, validate_linear_values,
                                       validate_stored_linear)

# Re-exported: the format constants and ``stored_tensor_headers`` live in runtime/checkpoint_modules.py,
# shared with the vLLM door.
__all__ = ["FORMAT_VERSION", "QUANT_METHOD", "READABLE_FORMATS", "TardisConfig", "TardisHfQuantizer",
           "attach_quantization_config", "register", "stored_tensor_headers"]


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
        # The same checks as the vLLM door's (runtime/checkpoint_modules.py).
        self.modules, self.linears, self.format_version = check_config(
            {"format_version": format_version, "modules": modules, "linears": linears, **kwargs})
        self.guard, self.budget, self.bundles, self.source = guard, budget, bundles, source

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
        wanted = dtype_of(getattr(model.config, "dtype", None))
        stored = stored_tensor_headers(checkpoint_files)
        plans = plan_modules(model, modules, stored, wanted)  # the same checks as the vLLM door's
        linears = _linear_modules(model, self.quantization_config.linears, stored, wanted)
        check_disjoint({**{t: (t, *plan.identities) for t, plan in plans.items()}, **{t: (t,) for t in linears}})
        for target, plan in plans.items():
            model.set_submodule(target, plan.empty("meta"))
            for fqn in plan.identities:
                model.set_submodule(fqn, torch.nn.Identity())
        for target, module in linears.items():
            model.set_submodule(target, module)
        model.tardis_swaps = dict(modules)
        model.tardis_linears = dict(self.quantization_config.linears)

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        specs = {target: swap["ffn"] for target, swap in self.quantization_config.modules.items()}
        warn_if_undigested(self.quantization_config.format_version)
        for name, module in model.named_modules():
            if isinstance(module, TardisFFN):
                finish_module(name, module, specs.get(name), self.quantization_config.format_version)
        for name, entry in self.quantization_config.linears.items():
            module = model.get_submodule(name)
            validate_linear_values(module, entry["linear"], f"tardis linear {name}")
            for key, tensor in (*module._buffers.items(), *module._parameters.items()):
                if tensor is not None and tensor.data_ptr() % ALIGN:  # as the packs: fresh, aligned memory
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
