"""``TardisVllmConfig``: vLLM's view of a tardis checkpoint's ``quantization_config``.

vLLM asks a quantization config for a method per layer (linear, embedding, attention). A tardis
checkpoint's attention projections, embeddings and head are dense, so linears get vLLM's
``UnquantizedLinearMethod`` and the rest ``None``; the compressed MLPs are whole modules, swapped
by the model overrides (``models.py``). The config is read by ``check_config``, the same function
the transformers door's ``TardisConfig`` runs.
"""
from __future__ import annotations

from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase

from ..runtime.checkpoint_modules import QUANT_METHOD, check_config


#: The HF architectures whose vLLM model classes the plugin overrides (``models.py``).
SERVED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM", "Qwen2ForCausalLM",
                        "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")


class TardisVllmConfig(QuantizationConfig):
    """The ``quantization_config`` of a tardis checkpoint, for vLLM.

    Example:
        >>> TardisVllmConfig.from_config({"quant_method": "tardis", "format_version": 3, "modules": {}}).get_name()
        'tardis'
    """

    def __init__(self, raw: dict[str, Any]) -> None:
        super().__init__()
        self.raw = dict(raw)
        self.modules, self.linears, self.format_version = check_config(self.raw)
        if self.linears:
            raise ValueError(f"this tardis checkpoint holds quantized linears ({sorted(self.linears)[:2]}..., "
                             "compress_(other_linears=...)); the vLLM door serves compressed FFNs only: compress "
                             "without other_linears, or serve it with transformers (from_pretrained)")
        self._architecture_checked = False
        self.served_by: str | None = None  # set by the model overrides (models.py)

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16, torch.float16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # the op has a CPU kernel and a torch path for every device

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # all of it is config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "TardisVllmConfig":
        return cls(config)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if not self._architecture_checked:
            check_architecture(self)  # a stock class would build dense MLPs for the compressed ones
            self._architecture_checked = True
        if isinstance(layer, LinearBase):
            return UnquantizedLinearMethod()
        return None


def check_architecture(quant: TardisVllmConfig) -> None:
    """ValueError unless one of the plugin's overrides is building the model (``served_by``): a stock
    vLLM class would build dense MLPs, with no weights, for the compressed ones.

    Example:
        >>> check_architecture(TardisVllmConfig({"modules": {}}))
        Traceback (most recent call last):
        ...
        ValueError: tardis: vLLM is building this tardis checkpoint with a model class the tardis plugin does not override (architectures ['?']); the plugin serves ['Gemma2ForCausalLM', 'Gemma3ForCausalLM', 'GemmaForCausalLM', 'LlamaForCausalLM', 'MistralForCausalLM', 'Phi3ForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'] (model_impl 'auto' or 'vllm'): serve this checkpoint with transformers (AutoModelForCausalLM.from_pretrained)
    """
    if quant.served_by in {f"Tardis{name}" for name in SERVED_ARCHITECTURES}:
        return
    try:
        from vllm.config import get_current_vllm_config

        architectures = list(get_current_vllm_config().model_config.architectures or [])
    except Exception:  # noqa: BLE001 - only for the message (no vLLM config outside an engine)
        architectures = ["?"]
    raise ValueError(f"tardis: vLLM is building this tardis checkpoint with a model class the tardis plugin does "
                     f"not override (architectures {architectures}); the plugin serves {sorted(SERVED_ARCHITECTURES)} "
                     "(model_impl 'auto' or 'vllm'): serve this checkpoint with transformers "
                     "(AutoModelForCausalLM.from_pretrained)")


def register_config() -> None:
    """Register ``TardisVllmConfig`` under ``"tardis"`` with vLLM (once per process).

    Example:
        >>> register_config(); QUANT_METHOD in QUANTIZATION_METHODS
        True
    """
    if QUANT_METHOD not in QUANTIZATION_METHODS:
        register_quantization_config(QUANT_METHOD)(TardisVllmConfig)
