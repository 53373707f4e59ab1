"""MiniLM accuracy vs FFN bytes read: coverage p x guard (x margin quantile), real weights, real text.

Each row: calibrate on Wikipedia calibration articles (32 windows of 128 tokens), compile with
backend="tardis", and compare sentence embeddings with the dense model on 128 held-out passages
(disjoint articles). The "exact" guard is the oracle (it reads W1 in full, so its bytes are not a
saving; its cosine is what a perfect predictor would give).

    python benchmarks/minilm_sweep.py        # writes benchmarks/results/minilm_sweep.json, prints a table
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
from datetime import date

import torch

HERE = os.path.dirname(__file__)
_spec = importlib.util.spec_from_file_location("minilm_demo", os.path.join(HERE, "..", "examples", "minilm_demo.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--coverages", nargs="+", type=float, default=[0.5, 0.7, 0.85, 0.95])
    parser.add_argument("--guards", nargs="+", default=["exact", "int8", "int4"])
    parser.add_argument("--out", default=os.path.join(HERE, "results", "minilm_sweep.json"))
    args = parser.parse_args()
    rows = []
    for p in args.coverages:
        for guard in args.guards:
            torch.compiler.reset()
            r = demo.run(p, calib_batches=32, passages=128, guard=guard, inner="eager")
            flag = sum(f.flag_rate for f in r["report"].ffns) / len(r["report"].ffns)
            recall = min(f.recall for f in r["report"].ffns)
            rows.append({"coverage": p, "guard": guard, "mean_cosine": r["mean_cosine"], "min_cosine": r["min_cosine"],
                         "bytes_ratio": r["bytes_ratio"], "flag_rate": flag, "min_recall": recall})
            print(rows[-1], flush=True)
    result = {"date": str(date.today()), "machine": f"{platform.machine()} {os.cpu_count()} cores",
              "torch": torch.__version__, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print("| p | guard | mean cosine | min cosine | flag rate | min recall | FFN bytes/token vs dense |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        bytes_cell = "(reads W1 in full)" if r["guard"] == "exact" else f"{r['bytes_ratio']:.3f}"
        print(f"| {r['coverage']} | {r['guard']} | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | "
              f"{r['flag_rate']:.3f} | {r['min_recall']:.4f} | {bytes_cell} |")


if __name__ == "__main__":
    main()
