"""Which guard serves the per-neuron policy best: int8, int4 and svd side by side, at the same FFN
bytes budgets, on a real model (one recording shared by every guard and budget).

For each (guard, budget): the mix is fitted for that guard's costs (``calibrate_for_budget``), the
model is compiled with ``backend="tardis"``, and the quality is measured on the evaluation harness's
quick data (MiniLM: embedding cosine to dense; SmolLM2: Wikipedia perplexity), with the guard's
recall and flag rate on held-out calibration tokens and the bytes read.

    python benchmarks/guards.py --model minilm                 # writes benchmarks/results/guards-minilm.json
    python benchmarks/guards.py --model smollm2 --budgets 0.5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone

import torch

import tardis_compiler as tc

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["minilm", "smollm2"], default="minilm")
    parser.add_argument("--guards", nargs="+", default=["int8", "int4", "svd"])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--svd-rank", type=int, default=0, help="0: a quarter of d_in")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tardis_compiler.eval.config import EvalConfig
    from tardis_compiler.eval.harness import prepare_data
    from tardis_compiler.eval.metrics import embedding_cosine, perplexity, sentence_embeddings
    from tardis_compiler.eval.models import load_model

    loaded = load_model(args.model)
    model, context = loaded.model, loaded.spec.default_context
    data = prepare_data(loaded, EvalConfig.from_preset("quick", model=args.model), context)
    config = tc.CalibrationConfig(progress=False, svd_rank=args.svd_rank)
    recorder = tc.record(model, data.calibration, config)

    def quality(m: torch.nn.Module) -> dict:
        with torch.no_grad():
            if args.model == "smollm2":
                return {"ppl": perplexity(m, data.windows, data.prefix).value}
            emb = sentence_embeddings(m, loaded.tokenizer, data.passages, max_length=context)
            return {"cosine": embedding_cosine(data.reference_embeddings, emb)["cosine_mean"]}

    rows = [{"guard": "dense", "budget": 1.0, **quality(model)}]
    print(rows[0], flush=True)
    for guard in args.guards:
        for budget in args.budgets:
            start = time.perf_counter()
            profile = tc.calibrate_for_budget(model, None, budget, guard, config, recorder=recorder)
            fit_s = time.perf_counter() - start
            torch.compiler.reset()
            compiled = torch.compile(model, backend="tardis", options={"profile": profile, "guard": guard, "dense_above": None,
                                                                        "inner": "eager"})
            measured = [f.stats["guards"][guard] for f in profile.ffns.values()]
            row = {"guard": guard, "budget": budget, **quality(compiled),
                   "bytes_fraction": profile.bytes_fraction(guard),
                   "recall": statistics.mean(g["recall"] for g in measured),
                   "flag_rate": statistics.mean(g["flag_rate"] for g in measured),
                   "guard_bytes_fraction": sum(g["bytes"] for g in measured)
                   / sum(f.bytes_per_token("dense") for f in profile.ffns.values()),
                   "kernel": measured[0]["kernel"], "fit_s": round(fit_s, 1)}
            rows.append(row)
            print(row, flush=True)

    print_table(rows)
    os.makedirs(RESULTS, exist_ok=True)
    out = os.path.join(RESULTS, f"guards-{args.model}.json")
    with open(out, "w") as f:
        json.dump({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": vars(args),
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"wrote {out}")


def print_table(rows: list[dict]) -> None:
    metric = "ppl" if "ppl" in rows[0] else "cosine"
    print(f"\n| guard | budget | {metric} | bytes read | guard bytes | recall | flag rate |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["guard"] == "dense":
            print(f"| dense | 1.0 | {r[metric]:.4f} | 1.000 | - | - | - |")
            continue
        print(f"| {r['kernel']} | {r['budget']} | {r[metric]:.4f} | {r['bytes_fraction']:.3f} | "
              f"{r['guard_bytes_fraction']:.3f} | {r['recall']:.3f} | {r['flag_rate']:.3f} |")


if __name__ == "__main__":
    main()
