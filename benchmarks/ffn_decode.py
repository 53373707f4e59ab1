"""Batch-1 decode time of one FFN: dense eager, dense inductor, and tardis at several coverages p.

Shapes: d=2048/m=8192 (GELU, synthetic weights: x ~ N(0, 1) as after a LayerNorm, W1 ~ N(0, 1/d),
so every neuron's z is Gaussian and calibrating on draws of the same distribution gives the
realistic flag rate), and the MiniLM shape d=384/m=1536 with MiniLM's real layer-0 FFN weights and
real inputs (hidden states of Wikipedia text). Calibration and timed inputs are disjoint draws.

All variants are timed in one process, interleaved, median of repeats, over 64 different input
rows cycled (so the set of flagged neurons changes from call to call, as in decoding). Also times
the parts of the tardis op, to show what limits it.

    python benchmarks/ffn_decode.py                    # writes benchmarks/results/ffn_decode.json
    python benchmarks/ffn_decode.py --shapes minilm    # one shape
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date

import torch
import torch.nn.functional as F

import tardis_compiler as tc
from tardis_compiler.runtime.correction import gather_rows_matmul, scatter_rows_matmul
from tardis_compiler.runtime.guard import LowBitGuard

RESULTS = os.path.join(os.path.dirname(__file__), "results")


class FFN(torch.nn.Module):
    def __init__(self, w1, b1, w2, b2):
        super().__init__()
        self.up = torch.nn.Linear(w1.shape[1], w1.shape[0])
        self.down = torch.nn.Linear(w2.shape[1], w2.shape[0])
        with torch.no_grad():
            self.up.weight.copy_(w1), self.up.bias.copy_(b1)
            self.down.weight.copy_(w2), self.down.bias.copy_(b2)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def synthetic(d: int, m: int, tokens: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(m, d, generator=g) / d ** 0.5
    w2 = torch.randn(d, m, generator=g) / m ** 0.5
    b1, b2 = torch.randn(m, generator=g) * 0.5, torch.zeros(d)
    return FFN(w1, b1, w2, b2).eval(), torch.randn(tokens, d, generator=g)


def minilm(tokens: int):
    from tardis_compiler.eval.corpus import calibration_batches
    from tardis_compiler.eval.models import load_minilm

    model, tokenizer = load_minilm()
    layer = model.encoder.layer[0]
    captured = []
    hook = layer.intermediate.dense.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].reshape(-1, 384)))
    with torch.no_grad():
        for batch in calibration_batches(tokenizer, context_length=128, num_batches=tokens // 126 + 1, seed=1):
            model(batch)
    hook.remove()
    x = torch.cat(captured)[:tokens]
    ffn = FFN(layer.intermediate.dense.weight, layer.intermediate.dense.bias,
              layer.output.dense.weight, layer.output.dense.bias).eval()
    return ffn, x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))]


def time_calls(fn, rows: torch.Tensor, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of one call, cycling through ``rows``."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(rows.shape[0]):
            fn(rows[i:i + 1])
        samples.append((time.perf_counter() - start) / rows.shape[0])
    return statistics.median(samples)


def bench_shape(name: str, ffn: FFN, x: torch.Tensor, coverages, guards, repeats: int) -> dict:
    calib, timed = x[:-64], x[-64:]
    variants = {"dense eager": ffn, "dense inductor": torch.compile(ffn)}
    profiles, settings = {}, {}
    for p in coverages:
        cfg = tc.CalibrationConfig(coverage=p, progress=False)
        profiles[p] = tc.calibrate(ffn, [calib[i:i + 256] for i in range(0, calib.shape[0], 256)], cfg)
        for guard in guards:
            torch.compiler.reset()
            key = f"tardis p={p} {guard}"
            settings[key] = (p, guard)
            variants[key] = torch.compile(ffn, backend="tardis", options={"profile": profiles[p], "guard": guard})
    with torch.no_grad():
        for fn in variants.values():  # compile and warm up
            for i in range(4):
                fn(timed[i:i + 1])
        times = {k: [] for k in variants}
        for _ in range(repeats):  # interleave the variants so drift hits all alike
            for k, fn in variants.items():
                times[k].append(time_calls(fn, timed, 1))
        timed_flag_rates = {}
        for key in settings:
            with tc.collect_stats() as stats:
                for i in range(timed.shape[0]):
                    variants[key](timed[i:i + 1])
            timed_flag_rates[key] = stats.ffns[""].flag_rate
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    dense = med["dense eager"]
    for k in med:
        row = {"variant": k, "us_per_call": med[k] * 1e6, "speedup_vs_eager": dense / med[k],
               "speedup_vs_inductor": med["dense inductor"] / med[k]}
        if k in settings:
            p, guard = settings[k]
            measured = profiles[p].ffns[""].stats["guards"][guard]
            row.update(coverage=p, guard=guard, calib_flag_rate=measured["flag_rate"],
                       timed_flag_rate=timed_flag_rates[k], rel_error=measured["rel_error"])
        rows.append(row)
    return {"shape": name, "d": ffn.up.in_features, "m": ffn.up.out_features, "rows": rows,
            "parts_us": parts(ffn, timed, profiles[0.85] if 0.85 in profiles else profiles[coverages[0]], repeats)}


def parts(ffn: FFN, timed: torch.Tensor, profile, repeats: int) -> dict:
    """Time the pieces of the tardis op on their own, at the calibrated flag rate."""
    prof = profile.ffns[""]
    w1, b1, w2 = ffn.up.weight.detach(), ffn.up.bias.detach(), ffn.down.weight.detach()
    m, d = w1.shape
    wf = torch.randn(w2.shape[0], d)
    guard4, guard8 = LowBitGuard.build(w1, 4, 64), LowBitGuard.build(w1, 8, 64)
    k = int(round(prof.stats["guards"]["int8"]["flag_rate"] * m))
    idx = torch.randperm(m)[:k].sort().values
    w2_rows = w2.t().contiguous()  # the op keeps this copy (runtime/fold.py)
    delta = torch.randn(1, k)
    with torch.no_grad():
        items = {
            "folded GEMV (d x d)": lambda x: F.linear(x, wf),
            "guard int4 GEMV (m x d)": lambda x: guard4.predict(x),
            "guard int8 GEMV (m x d)": lambda x: guard8.predict(x),
            f"gather W1 rows (int8 flag rate: {k})": lambda x: gather_rows_matmul(x, w1, idx),
            f"scatter W2 rows ({k})": lambda x: scatter_rows_matmul(delta, w2_rows, idx),
            "dense W1 GEMV (m x d)": lambda x: F.linear(x, w1),
        }
        return {name: time_calls(fn, timed, repeats) * 1e6 for name, fn in items.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["2048x8192", "minilm"])
    parser.add_argument("--coverages", nargs="+", type=float, default=[0.7, 0.85, 0.95])
    parser.add_argument("--guards", nargs="+", default=["int8", "int4"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(RESULTS, "ffn_decode.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"date": str(date.today()), "machine": f"{platform.machine()} {os.cpu_count()} cores",
               "torch": torch.__version__, "threads": torch.get_num_threads(), "shapes": []}
    for shape in args.shapes:
        if shape == "minilm":
            ffn, x = minilm(4096 + 64)
        else:
            d, m = map(int, shape.split("x"))
            ffn, x = synthetic(d, m, 4096 + 64)
        results["shapes"].append(bench_shape(shape, ffn, x, args.coverages, args.guards, args.repeats))
        torch.compiler.reset()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = []
    for s in results["shapes"]:
        lines.append(f"\n**{s['shape']}** (d={s['d']}, m={s['m']}, fp32, batch 1, {results['threads']} threads)\n")
        lines.append("| variant | us/call | vs dense eager | vs dense inductor | flag rate (calib / timed) | rel. error |")
        lines.append("|---|---|---|---|---|---|")
        for r in s["rows"]:
            flags = (f"{r['calib_flag_rate']:.3f} / {r['timed_flag_rate']:.3f}" if "coverage" in r else "-")
            err = f"{r['rel_error']:.3f}" if "coverage" in r else "-"
            lines.append(f"| {r['variant']} | {r['us_per_call']:.0f} | {r['speedup_vs_eager']:.2f}x | "
                         f"{r['speedup_vs_inductor']:.2f}x | {flags} | {err} |")
        lines.append("\nParts of the tardis op at p=0.85, alone (us/call): " +
                     ", ".join(f"{k} {v:.0f}" for k, v in s["parts_us"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
