"""Demo: compress MiniLM's FFNs with the tardis backend, on real text, offline.

Calibrates all-MiniLM-L6-v2 (real weights) on Wikipedia calibration articles with the defaults
(the per-neuron mix at ``tc.DEFAULT_BUDGET``, half the dense FFN bytes), compiles it with
backend="tardis", prints the explain table, then the mean embedding cosine to the dense model on
held-out passages (disjoint articles) and the FFN weight bytes read per token.

    python examples/minilm_demo.py                  # full demo, a few minutes on 2 cores
    python examples/minilm_demo.py --quick          # small slice (what CI runs)
    python examples/minilm_demo.py --budget 0.3     # another budget
    python examples/minilm_demo.py --coverage 0.85  # the uniform coverage fit (worst-case error bound)
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import tardis_compiler as tc
from tardis_compiler.eval.corpus import calibration_batches, evaluation_passages
from tardis_compiler.eval.models import load_minilm


def mean_pooled(model, encoded) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: masked mean, L2-normalised."""
    hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def run(budget: float | None, coverage: float | None, calib_batches: int, passages: int, guard: str | None,
        inner: str, seed: int = 0) -> dict:
    """Calibrate (at ``budget``; or with ``coverage``, the uniform coverage fit), compile, compare;
    returns the measured numbers."""
    model, tokenizer = load_minilm()
    started = time.time()
    batches = calibration_batches(tokenizer, context_length=128, num_batches=calib_batches, seed=seed)
    if coverage is not None:
        config = tc.CalibrationConfig(budget=None, coverage=coverage, seed=seed)
    else:
        config = tc.CalibrationConfig(budget=budget, seed=seed) if budget is not None else tc.CalibrationConfig(seed=seed)
    profile = tc.calibrate(model, batches, config)
    texts = evaluation_passages(count=passages, seed=seed)
    encoded = dict(tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt"))
    # dense_above=None: the passages go in one call (up to 128 tokens each, the whole batch at once),
    # which the default ("auto", faster for prefill on CPU) would run on the dense FFN: the cosine and
    # the explain table's flag rates are to measure the approximation, on every token.
    options = {"profile": profile, "guard": guard, "inner": inner, "dense_above": None}
    report = tc.explain(model, encoded, **options)
    torch.compiler.reset()
    compiled = torch.compile(model, backend="tardis", options=options)
    with torch.no_grad():
        dense = mean_pooled(model, encoded)
        folded = mean_pooled(compiled, encoded)
    cosine = (dense * folded).sum(-1)
    dense_bytes = sum(f.bytes_dense for f in report.ffns)
    tardis_bytes = sum(f.bytes_tardis for f in report.ffns)
    return {
        "report": report, "budget": config.budget, "coverage": coverage, "guard": guard, "calibration_tokens": profile.tokens,
        "passages": len(texts), "mean_cosine": cosine.mean().item(), "min_cosine": cosine.min().item(),
        "ffn_bytes_dense": dense_bytes, "ffn_bytes_tardis": tardis_bytes,
        "bytes_ratio": tardis_bytes / dense_bytes, "seconds": time.time() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, help=f"FFN bytes read per token, a fraction of dense "
                        f"(default {tc.DEFAULT_BUDGET})")
    parser.add_argument("--coverage", type=float, help="the uniform coverage fit instead: fraction p each "
                        "neuron's range holds")
    parser.add_argument("--guard", default=None, choices=tc.GUARDS, help="default: int8 for MiniLM's FFNs")
    parser.add_argument("--inner", default="inductor", choices=("inductor", "eager"))
    parser.add_argument("--quick", action="store_true", help="small slice: 4 calibration windows, 16 passages")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args()
    calib, passages = (4, 16) if args.quick else (32, 128)
    result = run(args.budget, args.coverage, calib, passages, args.guard, args.inner)
    print(result["report"])
    print()
    print(f"calibration: {result['calibration_tokens']} tokens of Wikipedia calibration articles")
    print(f"held-out passages: {result['passages']} (articles disjoint from calibration)")
    print(f"mean embedding cosine to dense: {result['mean_cosine']:.4f} (min {result['min_cosine']:.4f})")
    print(f"FFN weight bytes read per token: {result['ffn_bytes_tardis'] / 1e6:.3f} MB vs dense "
          f"{result['ffn_bytes_dense'] / 1e6:.3f} MB -> {result['bytes_ratio']:.3f} of dense "
          f"({1 - result['bytes_ratio']:.1%} fewer)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "report"}, f, indent=1)


if __name__ == "__main__":
    main()
