"""Hugging Face checkpoints of compressed models: ``save_pretrained`` / ``from_pretrained``.

``import tardis_compiler`` registers ``TardisConfig`` and ``TardisHfQuantizer`` for
``quant_method: "tardis"``. ``compress_`` attaches a ``TardisConfig`` to a transformers model, so
``model.save_pretrained(dir)`` writes the packs to safetensors and the swaps to ``config.json``'s
``quantization_config``; ``AutoModelForCausalLM.from_pretrained(dir)`` then rebuilds the
``TardisFFN`` and ``nn.Identity`` modules (empty, on the meta device) before the weights load into
them. Nothing is pickled.

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

from ..runtime.module import TardisFFN

QUANT_METHOD = "tardis"
#: Version of the checkpoint format (``TardisConfig``); ``TardisFFN.spec`` has its own.
FORMAT_VERSION = 2  # 2: int8 bundles (pack layout 2)
_ALIGN = 64  # bytes: torch's CPU allocations, and what the fused kernel's rows are laid out for


class TardisConfig(QuantizationConfigMixin):
    """``quantization_config`` of a compressed checkpoint: which modules became what.

    Args:
        modules: module FQN -> {"ffn": ``TardisFFN.spec()``, "mode": "module" | "split",
            "identities": FQNs replaced by ``nn.Identity``}.
        format_version: ``FORMAT_VERSION`` of the writer.
        guard, budget, bundles, source: how it was compressed (for people reading config.json;
            the modules alone rebuild the model).

    Example:
        >>> TardisConfig(modules={}).to_dict()["quant_method"]
        'tardis'
    """

    def __init__(self, modules: dict[str, Any] | None = None, format_version: int = FORMAT_VERSION,
                 guard: str | None = None, budget: float | None = None, bundles: str | None = None,
                 source: str = "", **kwargs: Any) -> None:
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = dict(modules or {})
        self.guard, self.budget, self.bundles, self.source = guard, budget, bundles, source
        if format_version != FORMAT_VERSION:
            raise ValueError(f"this checkpoint has tardis format version {format_version}; this tardis_compiler "
                             f"reads {FORMAT_VERSION}: install the tardis_compiler version that wrote it")
        unknown = sorted(set(kwargs) - {"quant_method"})
        if unknown:
            raise ValueError(f"unknown tardis quantization_config keys {unknown}: written by a newer "
                             "tardis_compiler? upgrade it")


class TardisHfQuantizer(HfQuantizer):
    """Rebuilds a compressed model's modules before its weights load (see the module docstring)."""

    requires_calibration = True  # a dense checkpoint cannot be compressed on load: use compress_

    def __init__(self, quantization_config: TardisConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        return None

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> None:
        wanted = _dtype_of(getattr(model.config, "dtype", None))
        for target, swap in self.quantization_config.modules.items():
            saved = swap["ffn"]["layout"]["element_type"]
            if wanted is not None and str(wanted).removeprefix("torch.") != saved:
                raise ValueError(f"this tardis checkpoint was compressed in {saved} (its packs are laid out for it); "
                                 f"load it with dtype=torch.{saved}, or compress the dense model in {wanted}")
            model.set_submodule(target, TardisFFN.empty(swap["ffn"], device="meta"))
            for fqn in swap.get("identities", ()):
                model.set_submodule(fqn, torch.nn.Identity())
        model.tardis_swaps = dict(self.quantization_config.modules)

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        from ..runtime.layout import Layout

        for name, module in model.named_modules():
            if isinstance(module, TardisFFN):
                try:
                    loaded = Layout.from_meta(module.meta.cpu(), module.layout.activation, module.layout.dtype)
                except ValueError as exc:
                    raise ValueError(f"tardis module {name}: its pack did not load from the checkpoint ({exc}); "
                                     "the checkpoint is incomplete or corrupt") from None
                if loaded != module.layout:
                    raise ValueError(f"tardis module {name}: the checkpoint's pack does not match config.json")
                module.meta = module.meta.cpu()
                # Tensors read from safetensors may sit at any offset of the file; the kernel's vector
                # loops peel differently on unaligned rows (last-bit differences): give every
                # buffer fresh, aligned memory, as a pack built in memory has.
                for key in ("weights", "guard", "floats", "neurons"):
                    tensor = getattr(module, key)
                    if tensor.data_ptr() % _ALIGN:
                        setattr(module, key, tensor.clone())
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True


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
                         bundles=report.bundles, source=profile.source)
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
