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


def build(root: Path, dtype: torch.dtype, budget: float = 0.5, windows: int = 2, context: int = 256) -> dict[str, Path]:
    """Three SmolLM2 checkpoints in ``root``, with their tokenizer: "dense", "tardis" (compressed at
    ``budget``, as ``tardis compress smollm2 OUT --budget 0.5``) and "exact" (the same profile with
    ``guard="all"``), calibrated once on ``windows`` Wikipedia windows of ``context`` tokens (few: a test
    builds them in minutes)."""
    import copy

    import tardis_compiler as tc
    from tardis_compiler.eval.corpus import calibration_batches
    from tardis_compiler.eval.models import load_model

    loaded = load_model("smollm2", dtype=dtype)
    batches = calibration_batches(loaded.tokenizer, context_length=context, num_batches=windows)
    profile = tc.calibrate(loaded.model, batches, tc.CalibrationConfig(budget=budget, progress=False))
    out = {}
    for name, guard in (("dense", None), ("tardis", None), ("exact", "all")):
        model = copy.deepcopy(loaded.model)
        if name != "dense":
            tc.compress_(model, profile, batches[0][:, :16], guard=guard, dense_above=-1)  # helpers.save_tiny
        out[name] = root / name
        model.save_pretrained(out[name])
        loaded.tokenizer.save_pretrained(out[name])
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
    parser.add_argument("--keep", default=None, help="folder to build the checkpoints in (reused when present)")
    parser.add_argument("--only", nargs="*", default=["dense", "tardis", "exact"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    root = Path(args.keep or tempfile.mkdtemp()) / args.dtype
    folders = {name: root / name for name in ("dense", "tardis", "exact")}
    if not all((f / "config.json").exists() for f in folders.values()):
        folders = build(root, dtype)
    for name in args.only:
        result = agreement(folders[name], dtype, enforce_eager=not args.compiled)
        print(name, json.dumps({k: result[k] for k in ("batched", "one_at_a_time")}), flush=True)
