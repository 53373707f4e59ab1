"""Worker of tests/vllm/test_hostile.py: load each hostile case (tests/hf/hostile.py's mutations) through
both doors and print one JSON line per case: ``{"case", "hf": OUTCOME, "vllm": OUTCOME}``, an outcome
being ``{"outcome": "ran", "tokens"/"logits_digest"}`` or ``{"outcome": "error", "error", "message"}``.

    python -m tests.vllm.hostile_worker LISTING.json     (in the vLLM venv)

A crash ends the process; the test names the case after the last line printed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch

#: Prompts that reach the fused kernel (decode, <= 64 tokens) and the torch path (a 70-token prefill).
PROMPTS = [[5], [3, 17, 40], list(range(3, 73))]


def hf_outcome(folder: str) -> dict:
    import transformers as T

    import tardis_compiler  # noqa: F401  (registers the quantizer)

    try:
        model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            logits = [model(torch.tensor([p])).logits for p in PROMPTS]
    except Exception as exc:  # noqa: BLE001 - the outcome is what we report
        return {"outcome": "error", "error": type(exc).__name__, "message": str(exc)}
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in logits)).hexdigest()
    return {"outcome": "ran", "digest": digest}


def vllm_outcome(folder: str) -> dict:
    from tests.vllm.helpers import engine, vllm_tokens

    try:
        with engine(Path(folder), max_model_len=96) as llm:
            tokens = vllm_tokens(llm, PROMPTS, 2)
    except Exception as exc:  # noqa: BLE001
        return {"outcome": "error", "error": type(exc).__name__, "message": str(exc)}
    return {"outcome": "ran", "tokens": tokens}


def main(listing: dict) -> None:
    for name, folder in listing["cases"]:
        print(json.dumps({"case": name, "hf": hf_outcome(folder), "vllm": vllm_outcome(folder)}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main(json.loads(Path(sys.argv[1]).read_text()))
