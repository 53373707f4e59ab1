"""Model overrides: vLLM's model classes, with each compressed MLP swapped for a ``TardisMLP``.

``register_models`` registers, under the stock architecture names, subclasses that behave exactly
as the stock classes unless the checkpoint's ``quantization_config`` is tardis. Then:

1. pipeline parallel sizes above 1 are refused; under tensor parallelism every rank checks and
   loads the whole pack, then keeps its part (``TardisMLP.shard``: neurons split across ranks, the
   all-reduce the only communication, as the stock down projection's);
2. each MLP that config.json lists is built as vLLM builds it and at once replaced by a parameter-
   shape view on the meta device (``_DenseShapes``: no memory). Llama, Mistral and Phi-3 do it per
   layer, through their ``layer_type=`` decoder-layer hook; the others after the model is built
   (their dense MLPs are allocated for a moment);
3. ``plan_modules`` checks every entry against that dense model and the stored tensor headers: the
   transformers door's checks, not a copy;
4. every planned target must be a ``model.layers.N.mlp`` swapped whole (mode "module"), and becomes
   an empty ``TardisMLP`` (meta device);
5. ``load_weights`` runs the stock loader, then ``finish_module`` on every pack (sha256, values,
   alignment), then ``TardisMLP.shard`` for this rank.

A tardis checkpoint of any other model class is refused by ``TardisVllmConfig.get_quant_method``
(``config.check_architecture``).
"""
from __future__ import annotations

import functools
import glob
import os
import re
from typing import Any, Iterable

import torch
from vllm import ModelRegistry
from vllm.model_executor.models import gemma, gemma2, gemma3, llama, mistral, phi3, qwen2, qwen3

from ..runtime.checkpoint_modules import ModulePlan, finish_module, plan_modules, stored_tensor_headers, \
    warn_if_undigested
from .config import SERVED_ARCHITECTURES, TardisVllmConfig
from .mlp import TardisMLP

#: Targets the plugin can serve: a decoder layer's whole MLP.
MLP_PATH = re.compile(r"model\.layers\.[0-9]+\.mlp")


class _DenseShapes(torch.nn.Module):
    """A stock MLP's parameter shapes on the meta device, what ``validate_swap`` checks a swap against;
    under tensor parallelism the whole (unsplit) shapes: a column-parallel linear's outputs and a
    row-parallel linear's inputs are split across ranks."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear

        for name, p in module.named_parameters():
            owner = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            shape, tp = list(p.shape), getattr(owner, "tp_size", 1)
            if isinstance(owner, ColumnParallelLinear):
                shape[0] *= tp
            elif isinstance(owner, RowParallelLinear) and name.endswith("weight"):
                shape[1] *= tp
            empty = torch.empty(shape, dtype=p.dtype, device="meta")
            self.register_parameter(name.replace(".", "__"), torch.nn.Parameter(empty, requires_grad=False))


def _tardis_config(vllm_config: Any) -> TardisVllmConfig | None:
    quant = getattr(vllm_config, "quant_config", None)
    return quant if isinstance(quant, TardisVllmConfig) else None


def refuse_parallel(vllm_config: Any) -> None:
    """ValueError for a tardis checkpoint at pipeline parallel size above 1 (tensor parallel is
    served: each rank keeps its neurons of every pack).

    Example:
        >>> from types import SimpleNamespace as NS
        >>> refuse_parallel(NS(parallel_config=NS(tensor_parallel_size=2, pipeline_parallel_size=1)))
        >>> refuse_parallel(NS(parallel_config=NS(tensor_parallel_size=1, pipeline_parallel_size=2)))
        Traceback (most recent call last):
        ...
        ValueError: tardis checkpoints in vLLM run at pipeline_parallel_size=1 only (got 2): serve with tensor parallelism instead
    """
    pp = vllm_config.parallel_config.pipeline_parallel_size
    if pp > 1:
        raise ValueError(f"tardis checkpoints in vLLM run at pipeline_parallel_size=1 only (got {pp}): serve with "
                         "tensor parallelism instead")


def _checkpoint_files(model: str) -> list[str] | None:
    files = sorted(glob.glob(os.path.join(model, "*.safetensors"))) if os.path.isdir(model) else []
    return files or None


class _TardisModel:
    """Mixin of the overrides (see the module docstring); ``_tardis_swap`` runs after the stock
    ``__init__``."""

    _tardis_plans: dict[str, ModulePlan] = {}
    _tardis_format = 0
    _tardis_tp = 1

    def _tardis_begin(self, vllm_config: Any) -> TardisVllmConfig | None:
        quant = _tardis_config(vllm_config)
        if quant is not None:
            refuse_parallel(vllm_config)
            quant.served_by = type(self).__name__
            self._tardis_tp = vllm_config.parallel_config.tensor_parallel_size
        return quant

    def _tardis_swap(self, vllm_config: Any) -> None:
        quant = _tardis_config(vllm_config)
        if quant is None:
            return
        model: torch.nn.Module = self  # type: ignore[assignment]
        for target in quant.modules:  # models without a layer hook: the dense MLPs go now
            if MLP_PATH.fullmatch(target) and not isinstance(_get(model, target), (_DenseShapes, type(None))):
                model.set_submodule(target, _DenseShapes(model.get_submodule(target)))
        stored = stored_tensor_headers(_checkpoint_files(vllm_config.model_config.model))
        plans = plan_modules(model, quant.modules, stored, vllm_config.model_config.dtype)
        for target, plan in plans.items():
            if not MLP_PATH.fullmatch(target) or plan.identities:
                raise ValueError(f"tardis module {target}: the vLLM plugin serves whole decoder-layer MLPs "
                                 "(model.layers.N.mlp, mode 'module'), not this swap: serve this checkpoint with "
                                 "transformers (AutoModelForCausalLM.from_pretrained)")
            model.set_submodule(target, TardisMLP.from_plan(plan))
        self._tardis_plans, self._tardis_format = plans, quant.format_version

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = super().load_weights(weights)  # type: ignore[misc]
        if self._tardis_plans:
            warn_if_undigested(self._tardis_format)
            model: torch.nn.Module = self  # type: ignore[assignment]
            from vllm.distributed import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank() if self._tardis_tp > 1 else 0
            for target, plan in self._tardis_plans.items():
                module = model.get_submodule(target)
                finish_module(target, module, plan.spec, self._tardis_format)
                module.shard(rank, self._tardis_tp)
        return loaded


def _get(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


@functools.cache
def _shrinking(layer_type: type) -> type:
    """``layer_type`` whose MLP, when config.json lists it, becomes a ``_DenseShapes`` once built."""

    class Layer(layer_type):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            quant = _tardis_config(kwargs.get("vllm_config"))
            if quant is not None and f"{kwargs.get('prefix', '')}.mlp" in quant.modules:
                self.mlp = _DenseShapes(self.mlp)

    Layer.__name__ = Layer.__qualname__ = f"Tardis{layer_type.__name__}"
    return Layer


def _with_layer_hook(stock: type, default_layer: type) -> type:
    """An override of ``stock`` (``__init__(*, vllm_config, prefix, layer_type)``)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "", layer_type: type = default_layer) -> None:
        if self._tardis_begin(vllm_config) is not None:
            layer_type = _shrinking(layer_type)
        stock.__init__(self, vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self._tardis_swap(vllm_config)

    return type(f"Tardis{stock.__name__}", (_TardisModel, stock), {"__init__": __init__, "__module__": __name__})


def _after_init(stock: type) -> type:
    """An override of ``stock`` (``__init__(*, vllm_config, prefix)``), swapping after the stock build."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        self._tardis_begin(vllm_config)
        stock.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self._tardis_swap(vllm_config)

    return type(f"Tardis{stock.__name__}", (_TardisModel, stock), {"__init__": __init__, "__module__": __name__})


TardisLlamaForCausalLM = _with_layer_hook(llama.LlamaForCausalLM, llama.LlamaDecoderLayer)
TardisMistralForCausalLM = _with_layer_hook(mistral.MistralForCausalLM, mistral.MistralDecoderLayer)
TardisPhi3ForCausalLM = _with_layer_hook(phi3.Phi3ForCausalLM, llama.LlamaDecoderLayer)
TardisQwen2ForCausalLM = _after_init(qwen2.Qwen2ForCausalLM)
TardisQwen3ForCausalLM = _after_init(qwen3.Qwen3ForCausalLM)
TardisGemmaForCausalLM = _after_init(gemma.GemmaForCausalLM)
TardisGemma2ForCausalLM = _after_init(gemma2.Gemma2ForCausalLM)
TardisGemma3ForCausalLM = _after_init(gemma3.Gemma3ForCausalLM)

#: HF architecture name -> the override class served for it (``config.SERVED_ARCHITECTURES``).
ARCHITECTURES: dict[str, type] = {cls.__name__.removeprefix("Tardis"): cls for cls in (
    TardisLlamaForCausalLM, TardisMistralForCausalLM, TardisPhi3ForCausalLM, TardisQwen2ForCausalLM,
    TardisQwen3ForCausalLM, TardisGemmaForCausalLM, TardisGemma2ForCausalLM, TardisGemma3ForCausalLM)}
assert set(ARCHITECTURES) == set(SERVED_ARCHITECTURES)


def register_models() -> None:
    """Register the overrides under the stock architecture names (vLLM then builds them for every
    checkpoint of these architectures; dense ones run exactly as the stock classes).

    Example:
        >>> register_models(); "LlamaForCausalLM" in ModelRegistry.get_supported_archs()
        True
    """
    for name, cls in ARCHITECTURES.items():
        ModelRegistry.register_model(name, f"{__name__}:{cls.__name__}")
