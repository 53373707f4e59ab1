"""Real SmolLM2-135M checkpoints for the vLLM tier: dense and compressed, in a dtype, built once.

``python -m tests.vllm.smollm2 [--compiled] [--dtype bfloat16]`` (in the vLLM venv) prints the HF-vs-vLLM
greedy agreement on ``PROMPTS`` (64 new tokens each): first differing token per prompt, dense and tardis.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

PROMPTS = [
    "The capital of France is",
    "Photosynthesis is the process by which",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
    "To bake bread, you first need",
    "The history of the Roman Empire began",
    "Water boils at a temperature of",
]
NEW_TOKENS = 64


def build(out: Path, dtype: torch.dtype, budget: float | None = 0.5, guard: str | None = None,
          windows: int = 2, context: int = 256) -> Path:
    """SmolLM2 compressed at ``budget`` (``tardis compress smollm2 OUT``, on ``windows`` calibration windows
    of ``context`` tokens: few, so that a test builds it in minutes), or dense (``budget=None``), saved
    with its tokenizer in ``out``."""
    from tardis_compiler.eval.models import load_model
    from tardis_compiler.hf.checkpoint import compress_pretrained

    if budget is None:
        loaded = load_model("smollm2", dtype=dtype)
        loaded.model.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
        return out
    compress_pretrained("smollm2", out, budget, guard=guard, calibration_batches=windows, context_length=context,
                        dtype=dtype, progress=False)
    return out


def prompt_ids(folder: Path) -> list[list[int]]:
    """``PROMPTS`` through the checkpoint's tokenizer (both doors get the same token ids)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token, None when equal.

    Example:
        >>> first_difference([1, 2, 3], [1, 2, 4]), first_difference([1], [1])
        (2, None)
    """
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def agreement(folder: Path, dtype: torch.dtype, **engine_options: Any) -> dict[str, Any]:
    """HF and vLLM greedy tokens of ``folder``: per prompt, the first differing index (None: identical)."""
    from tests.vllm.helpers import engine, hf_tokens, vllm_tokens

    ids = prompt_ids(folder)
    hf = hf_tokens(folder, ids, NEW_TOKENS, dtype)
    with engine(folder, dtype=str(dtype).removeprefix("torch."), max_model_len=256, **engine_options) as llm:
        batched = vllm_tokens(llm, ids, NEW_TOKENS)
        single = vllm_tokens(llm, ids, NEW_TOKENS, one_at_a_time=True)
    return {"batched": [first_difference(a, b) for a, b in zip(hf, batched)],
            "one_at_a_time": [first_difference(a, b) for a, b in zip(hf, single)],
            "hf": hf, "vllm": batched}


if __name__ == "__main__":
    import tempfile

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    parser = argparse.ArgumentParser()
    parser.add_argument("--compiled", action="store_true", help="vLLM's default compiled mode (not enforce_eager)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--dense", action="store_true", help="also the dense checkpoint")
    parser.add_argument("--keep", default=None, help="folder to build the checkpoints in (reused when present)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    root = Path(args.keep or tempfile.mkdtemp())
    kinds = {"tardis-0.5": 0.5, **({"dense": None} if args.dense else {})}
    report = {}
    for name, budget in kinds.items():
        folder = root / f"{name}-{args.dtype}"
        if not (folder / "config.json").exists():
            build(folder, dtype, budget)
        result = agreement(folder, dtype, enforce_eager=not args.compiled)
        report[name] = {k: result[k] for k in ("batched", "one_at_a_time")}
        print(name, json.dumps(report[name]), flush=True)
