"""SmolLM2 perplexity under the gated-FFN policy: budgets x allocation ("layer": every FFN meets the
budget; "model": one budget shared by all FFNs, bytes to the largest relative error), beside dense.

Calibrates once (the per-neuron options do not depend on the budget), then chooses the mix for
every setting. Perplexity on held-out Wikipedia windows (context 512), ``backend="tardis"``.

    python benchmarks/gated_policy.py                        # writes benchmarks/results/gated_policy-int4.json
    python benchmarks/gated_policy.py --guard int8           # the int8 guard, for comparison
    python benchmarks/gated_policy.py --windows 8 --budgets 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone

import torch

import tardis_compiler as tc
from tardis_compiler.calibrate import record
from tardis_compiler.calibrate.allocate import allocate
from tardis_compiler.calibrate.gated import finish_gated_ffn, prepare_gated_ffn

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def profile_for(cands, budget: float, allocation: str, config) -> tc.Profile:
    picks = allocate(cands, budget, allocation)
    ffns = {c.record.name: finish_gated_ffn(c, v, ch, budget) for c, (v, ch) in zip(cands, picks)}
    return tc.Profile(ffns=ffns, config=config, tokens=0, source=f"gated_policy {budget} {allocation}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--allocations", nargs="+", default=["layer", "model"])
    parser.add_argument("--guard", default="int4", help="int4 is the default for gated FFNs")
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tardis_compiler.eval.corpus import calibration_batches, evaluation_windows, special_tokens
    from tardis_compiler.eval.metrics import perplexity
    from tardis_compiler.eval.models import load_smollm2

    model, tokenizer = load_smollm2()
    prefix = special_tokens(tokenizer)[0]
    windows = evaluation_windows(tokenizer, context_length=512, num_windows=args.windows)
    config = tc.CalibrationConfig(progress=False)
    start = time.perf_counter()
    recorder = record(model, calibration_batches(tokenizer, context_length=512, num_batches=args.calibration_batches),
                      config)
    cands = [prepare_gated_ffn(r, config, args.guard) for r in recorder.ffns.values()]
    prepare_s = time.perf_counter() - start
    with torch.no_grad():
        dense = perplexity(model, windows, prefix).value
    rows = [{"setting": "dense", "budget": 1.0, "ppl": dense}]
    print(f"dense PPL {dense:.2f} ({len(windows)} windows); options prepared in {prepare_s:.0f} s")
    for budget in args.budgets:
        for allocation in args.allocations:
            profile = profile_for(cands, budget, allocation, config)
            torch.compiler.reset()
            compiled = torch.compile(model, backend="tardis", options={"profile": profile, "guard": args.guard,
                                                                                     "dense_above": None})
            with torch.no_grad():
                ppl = perplexity(compiled, windows, prefix).value
            spent = [f.stats["bytes_fraction"] for f in profile.ffns.values()]
            row = {"setting": allocation, "budget": budget, "ppl": ppl, "bytes_fraction": profile.bytes_fraction(args.guard),
                   "bytes_per_layer": spent,
                   "exact_per_layer": [f.stats["policy"]["counts"].get("exact", 0) for f in profile.ffns.values()],
                   "folded_matrix_layers": sum(f.stats["policy"]["folded_matrix"] for f in profile.ffns.values())}
            rows.append(row)
            print(f"budget {budget:.2f} {allocation:6}: PPL {ppl:8.2f} ({ppl / dense - 1:+.1%}), bytes "
                  f"{row['bytes_fraction']:.3f} of dense (layers {min(spent):.2f}-{max(spent):.2f}), "
                  f"{row['folded_matrix_layers']} layers with a folded matrix", flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"gated_policy-{args.guard}.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "torch": torch.__version__,
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
