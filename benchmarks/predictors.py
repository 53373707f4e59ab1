"""Guard predictors on SmolLM2's gated FFNs: low-bit copies of W_g vs the whitened truncated SVD.

    python benchmarks/predictors.py                 # all 30 layers (~10 min on 2 busy cores)
    python benchmarks/predictors.py --layers 0 15   # a quick look at two layers

For every layer the MLP inputs x are captured (forward pre-hooks on ``model.model.layers[i].mlp``)
on Wikipedia calibration windows; whole windows are split 80/20 into fit and held-out tokens (so
held-out text is unseen). Per layer and coverage p, the range of neuron i is the shortest interval
covering p of its fit-split gate pre-activations g = x W_g^T. Predictors: ``LowBitGuard`` int8 and
int4 (group 64), and ``SVDPredictor`` at several ranks (built on the fit split). Margins, fit on
the fit split: (a) ``recall_margins(target_recall=0.99)`` (one scale of the per-neuron error std
per layer), (b) ``greedy_margins(target_missed=0.01)`` with the cost (silu(g) u)^2 ||W_d[:, i]||^2.

Reported on the held-out split, per layer, then averaged over layers (and the worst layer):
recall = flagged & out-of-range / out-of-range; flag rate; missed cost = out-of-range cost not
flagged / all out-of-range cost; predictor bytes read per token over the dense gated FFN's
3 m d 4 bytes (fp32); and predictor + flagged bytes, (predictor + flag_rate 3 d 4 m) / (3 m d 4)
(the folded d x d matrix is not counted). "oracle" flags exactly the out-of-range neurons for free:
the floor any predictor is measured against.

Writes benchmarks/results/predictors-<date>.json (every layer's numbers) and prints the table.
``--skip-first 1`` drops each window's first position (``-skip1`` is added to the file name): in
some layers that attention-sink token carries ~98-99.9% of the out-of-range cost, so a missed-cost
target is met by flagging it alone (greedy recall 0.14 on layer 11 of SmolLM2 with it included).
``--threads 1`` ran ~3x faster than 2 on a 2-core machine busy with other jobs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
from tardis_compiler.calibrate.margins import recall_margins  # noqa: E402
from tardis_compiler.calibrate.ranges import shortest_intervals  # noqa: E402
from tardis_compiler.runtime.guard import LowBitGuard  # noqa: E402
from tardis_compiler.runtime.svd_predictor import SVDPredictor, greedy_margins  # noqa: E402

HERE = Path(__file__).resolve().parent


def capture_mlp_inputs(model, batches, max_tokens: int) -> list[list[torch.Tensor]]:
    """Per layer, the list of per-window MLP inputs (tokens, d) in float32."""
    layers = model.model.layers
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda _mod, args, i=i: captured[i].append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            seen = 0
            for batch in batches:
                if seen >= max_tokens:
                    break
                model(batch)
                seen += batch.numel()
    finally:
        for h in hooks:
            h.remove()
    return captured


def split_windows(windows: list[torch.Tensor], fit_fraction: float, max_tokens: int):
    """Whole windows to fit / held-out (first ``fit_fraction`` of them fit), at most max_tokens."""
    x = torch.cat(windows)[:max_tokens]
    sizes = [w.shape[0] for w in windows]
    n_fit_windows = max(1, min(len(windows) - 1, round(fit_fraction * len(windows))))
    n_fit = min(sum(sizes[:n_fit_windows]), x.shape[0] - 1)
    return x[:n_fit], x[n_fit:]


def evaluate(g, g_hat, lower, upper, margins, cost) -> dict[str, float]:
    flagged = (g_hat < lower + margins) | (g_hat > upper - margins)
    outside = (g < lower) | (g > upper)
    missed = outside & ~flagged
    n_out, n_missed = torch.count_nonzero(outside).item(), torch.count_nonzero(missed).item()
    out_cost = (cost * outside).sum().item()
    return {
        "recall": 1.0 - n_missed / max(1, n_out),
        "flag_rate": torch.count_nonzero(flagged).item() / flagged.numel(),
        "out_rate": n_out / outside.numel(),
        "missed_cost": (cost * missed).sum().item() / out_cost if out_cost > 0 else 0.0,
    }


def run_layer(mlp, x_fit, x_held, args) -> list[dict]:
    w_g = mlp.gate_proj.weight.detach().float()
    w_u = mlp.up_proj.weight.detach().float()
    w_d = mlp.down_proj.weight.detach().float()
    m, d = w_g.shape
    dense_bytes = 3 * m * d * 4
    col_norm2 = (w_d ** 2).sum(dim=0)  # ||W_d[:, i]||^2
    g_fit, g_held = x_fit @ w_g.T, x_held @ w_g.T
    cost_fit = (F.silu(g_fit) * (x_fit @ w_u.T)) ** 2 * col_norm2
    cost_held = (F.silu(g_held) * (x_held @ w_u.T)) ** 2 * col_norm2

    predictors = {}
    for bits in args.bits:
        guard = LowBitGuard.build(w_g, bits, 64)
        predictors[f"int{bits}-g64"] = (guard, guard.bytes_read(m, d))
    for svd in SVDPredictor.build_ranks(w_g, x_fit, args.ranks):
        predictors[svd.kernel] = (svd, svd.bytes_read(4))

    ranges = {p: shortest_intervals(g_fit, p) for p in args.coverages}
    rows = []
    for p, (lower, upper) in ranges.items():
        oracle = evaluate(g_held, g_held, lower, upper, torch.zeros(m), cost_held)
        rows.append({"predictor": "oracle", "margins": "-", "p": p, "predictor_bytes": 0,
                     "pred_frac": 0.0, "total_frac": oracle["flag_rate"], **oracle})
    for name, (pred, pred_bytes) in predictors.items():
        gh_fit, gh_held = pred.predict(x_fit), pred.predict(x_held)
        rel_err = ((gh_held - g_held).norm() / g_held.norm()).item()
        for p, (lower, upper) in ranges.items():
            margin_sets = {
                "recall0.99": recall_margins(g_fit, gh_fit, lower, upper, 0.99),
                "greedy0.01": greedy_margins(g_fit, gh_fit, lower, upper, cost_fit, 0.01),
            }
            for how, margins in margin_sets.items():
                held = evaluate(g_held, gh_held, lower, upper, margins, cost_held)
                fit = evaluate(g_fit, gh_fit, lower, upper, margins, cost_fit)
                rows.append({
                    "predictor": name, "margins": how, "p": p, "predictor_bytes": pred_bytes,
                    "pred_frac": pred_bytes / dense_bytes,
                    "total_frac": (pred_bytes + held["flag_rate"] * 3 * d * 4 * m) / dense_bytes,
                    "rel_error": rel_err, **held,
                    "fit_recall": fit["recall"], "fit_missed_cost": fit["missed_cost"],
                    "fit_flag_rate": fit["flag_rate"],
                })
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    keys = []
    for r in rows:
        k = (r["predictor"], r["margins"], r["p"])
        if k not in keys:
            keys.append(k)
    out = []
    for k in keys:
        rs = [r for r in rows if (r["predictor"], r["margins"], r["p"]) == k]
        mean = lambda f: sum(r[f] for r in rs) / len(rs)  # noqa: E731
        out.append({
            "predictor": k[0], "margins": k[1], "p": k[2], "layers": len(rs),
            "recall": mean("recall"), "recall_worst": min(r["recall"] for r in rs),
            "flag_rate": mean("flag_rate"), "flag_rate_worst": max(r["flag_rate"] for r in rs),
            "missed_cost": mean("missed_cost"), "missed_cost_worst": max(r["missed_cost"] for r in rs),
            "pred_frac": mean("pred_frac"),
            "total_frac": mean("total_frac"), "total_frac_worst": max(r["total_frac"] for r in rs),
            "worst_missed_layer": max(rs, key=lambda r: r["missed_cost"])["layer"],
        })
    return out


def print_table(summary: list[dict]) -> None:
    head = (f"{'p':>4} {'predictor':<10} {'margins':<10} | {'recall':>6} {'worst':>6} | {'flag':>5} {'worst':>5} | "
            f"{'missed$':>7} {'worst':>6} | {'pred B':>6} | {'pred+flag B':>11} {'worst':>6}")
    print(head)
    print("-" * len(head))
    last_p = None
    for s in sorted(summary, key=lambda s: (s["p"], s["predictor"] != "oracle")):
        if last_p is not None and s["p"] != last_p:
            print("-" * len(head))
        last_p = s["p"]
        print(f"{s['p']:>4} {s['predictor']:<10} {s['margins']:<10} | {s['recall']:6.4f} {s['recall_worst']:6.4f} | "
              f"{s['flag_rate']:5.3f} {s['flag_rate_worst']:5.3f} | {s['missed_cost']:7.4f} "
              f"{s['missed_cost_worst']:6.4f} | {s['pred_frac']:6.3f} | {s['total_frac']:11.3f} "
              f"{s['total_frac_worst']:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=16, help="calibration windows (whole ones are split)")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=8192, help="tokens kept per layer")
    parser.add_argument("--fit-fraction", type=float, default=0.8)
    parser.add_argument("--coverages", nargs="+", type=float, default=[0.7, 0.85])
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    parser.add_argument("--ranks", nargs="+", type=int, default=[32, 64, 128, 192])
    parser.add_argument("--layers", nargs="+", type=int, default=None, help="layer indices (default: all)")
    parser.add_argument("--skip-first", type=int, default=0,
                        help="drop the first N positions of every window (attention-sink tokens, whose "
                             "massive activations dominate the out-of-range cost in some layers)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tardis_compiler.eval.corpus import calibration_batches
    from tardis_compiler.eval.models import load_smollm2

    start = time.time()
    model, tokenizer = load_smollm2()
    batches = calibration_batches(tokenizer, context_length=args.context, num_batches=args.windows)
    captured = capture_mlp_inputs(model, batches, args.max_tokens)
    print(f"[predictors] captured {len(batches)} windows x {args.context} tokens in {time.time() - start:.0f} s",
          flush=True)
    layer_ids = args.layers if args.layers is not None else list(range(len(model.model.layers)))
    rows = []
    for i in layer_ids:
        t0 = time.time()
        windows = [w[args.skip_first:] for w in captured[i]]
        x_fit, x_held = split_windows(windows, args.fit_fraction, args.max_tokens)
        for r in run_layer(model.model.layers[i].mlp, x_fit, x_held, args):
            rows.append({"layer": i, "fit_tokens": x_fit.shape[0], "held_tokens": x_held.shape[0], **r})
        print(f"[predictors] layer {i}: {time.time() - t0:.1f} s", flush=True)
    summary = summarize(rows)
    elapsed = time.time() - start
    print()
    print_table(summary)
    print(f"\n{len(layer_ids)} layers, {x_fit.shape[0]} fit / {x_held.shape[0]} held-out tokens per layer, "
          f"{elapsed:.0f} s")

    suffix = f"-skip{args.skip_first}" if args.skip_first else ""
    out = Path(args.out) if args.out else HERE / "results" / f"predictors-{date.today().isoformat()}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": args.threads, "seconds": elapsed,
        "args": vars(args), "summary": summary, "rows": rows,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
