"""What each calibration change buys, alone and together: SmolLM2 perplexity at a budget, beside dense.

Variants are ``CalibrationConfig`` overrides (``VARIANTS``), each calibrated on the same Wikipedia
windows and measured on the same held-out windows (context 512, ``backend="tardis"``, the default
guard), with its calibration time. Variants that share the recording fit from one recorder; the
calibration time reported for each counts its own recording share (``record_s``) once.

    python benchmarks/calibration_ablation.py                       # budget 0.5, every variant
    python benchmarks/calibration_ablation.py --budgets 0.3 0.5 --variants lines lstsq
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from datetime import datetime, timezone

import torch

import tardis_compiler as tc
from tardis_compiler.calibrate import calibrate_for_budget, record

RESULTS = os.path.join(os.path.dirname(__file__), "results")

#: name -> CalibrationConfig overrides.
VARIANTS = {
    "before": {"fold_fit": "lines", "sequential": 1, "allocation": "layer"},  # calibration before issue 10
    "lstsq": {"fold_fit": "lstsq", "sequential": 1, "allocation": "layer"},  # + the least-squares fold alone
    "sequential": {"fold_fit": "lines", "sequential": 6, "allocation": "layer"},  # + sequential alone (6 groups)
    "loss": {"fold_fit": "lines", "sequential": 1, "allocation": "loss"},  # + loss-weighted allocation alone
    "all": {"fold_fit": "lstsq", "sequential": 6, "allocation": "loss"},  # all three
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--calibration-batches", type=int, default=32, help="the standard preset's")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=os.path.join(RESULTS, "calibration_ablation.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tardis_compiler.eval.corpus import calibration_batches, evaluation_windows, special_tokens
    from tardis_compiler.eval.metrics import perplexity
    from tardis_compiler.eval.models import load_smollm2

    model, tokenizer = load_smollm2()
    prefix = special_tokens(tokenizer)[0]
    windows = evaluation_windows(tokenizer, context_length=512, num_windows=args.windows)
    batches = calibration_batches(tokenizer, context_length=512, num_batches=args.calibration_batches)
    with torch.no_grad():
        dense = perplexity(model, windows, prefix).value
    print(f"dense: PPL {dense:.3f}", flush=True)
    rows = [{"variant": "dense", "budget": 1.0, "ppl": dense}]
    base = tc.CalibrationConfig(progress=False)
    start = time.perf_counter()
    recorder = record(model, batches, base)
    record_s = time.perf_counter() - start
    for name in args.variants:
        config = dataclasses.replace(base, **VARIANTS[name])
        for budget in args.budgets:
            start = time.perf_counter()
            profile = calibrate_for_budget(model, batches, budget, config=config, recorder=recorder)
            fit_s = time.perf_counter() - start
            torch.compiler.reset()
            compiled = torch.compile(model, backend="tardis", options={"profile": profile, "inner": "eager",
                                                                                     "dense_above": None})
            with torch.no_grad():
                ppl = perplexity(compiled, windows, prefix).value
            row = {"variant": name, "budget": budget, "ppl": ppl, "ppl_vs_dense": ppl / dense - 1,
                   "bytes_fraction_calibration": profile.bytes_fraction(), "record_s": record_s, "fit_s": fit_s,
                   "config": VARIANTS[name]}
            rows.append(row)
            print(f"{name:>8} @ {budget}: PPL {ppl:.3f} ({100 * row['ppl_vs_dense']:+.1f}%), bytes "
                  f"{row['bytes_fraction_calibration']:.3f}, fit {fit_s:.0f} s (+ record {record_s:.0f} s)", flush=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "threads": args.threads,
                   "calibration_batches": args.calibration_batches, "windows": args.windows, "rows": rows}, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
