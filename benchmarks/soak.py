"""Soak test (a script, not in CI): does anything grow when tardis runs for a long time?

1. 2,000 greedy decode steps of SmolLM2-135M (bf16, tardis at budget 0.5, inductor), as 20
   generate() calls of 100 new tokens; resident memory and time per step every 100 steps.
2. 50 cycles of calibrate -> torch.compile(backend="tardis") -> run -> explain -> drop the compiled
   model (``torch.compiler.reset()``, as a program that builds and drops models does) on a tiny
   LLaMA; resident memory and seconds per cycle.

Both must stay flat: the script prints each series and the growth from the first to the last
quarter, and writes benchmarks/results/soak.json.

    python benchmarks/soak.py
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

import tardis_compiler as tc
from common import cached_profiles, machine, write_json


def rss_mb() -> float:
    """Resident set size of this process, MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def decode_soak(steps: int, per_call: int) -> list[dict]:
    from tardis_compiler.eval.corpus import calibration_batches, evaluation_windows, special_tokens
    from tardis_compiler.eval.models import load_smollm2

    base, tok = load_smollm2()
    model = base.to(torch.bfloat16)
    batches = calibration_batches(tok, context_length=512, num_batches=16)
    profile = cached_profiles("smollm2-bfloat16", model, batches, [0.5], tc.CalibrationConfig(progress=False))[0.5]
    model.forward = torch.compile(model.forward, backend="tardis", dynamic=True, options={"profile": profile})
    prefix = torch.tensor(special_tokens(tok)[0], dtype=torch.long)
    windows = evaluation_windows(tok, context_length=512, num_windows=steps // per_call)
    series, done = [], 0
    with torch.no_grad():
        model.generate(torch.cat([prefix, windows[0][:16]])[None], max_new_tokens=4, do_sample=False,
                       pad_token_id=tok.eos_token_id)  # compile
        for window in windows:
            prompt = torch.cat([prefix, window[:16]])[None]
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=per_call, min_new_tokens=per_call, do_sample=False,
                           pad_token_id=tok.eos_token_id)
            done += per_call
            series.append({"steps": done, "ms_per_step": (time.perf_counter() - start) / per_call * 1e3,
                           "rss_mb": rss_mb()})
            print(f"decode {done:5d} steps: {series[-1]['ms_per_step']:.1f} ms/step, {series[-1]['rss_mb']:.0f} MB",
                  flush=True)
    return series


def cycle_soak(cycles: int, control: bool = False) -> list[dict]:
    """``control``: the same loop with plain ``torch.compile(model, backend="eager")`` and no tardis,
    to tell dynamo's own growth per compile from ours."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.tiny_models import build_tiny, token_batches

    model = build_tiny("llama")
    batches = token_batches(4)
    series = []
    for i in range(cycles):
        start = time.perf_counter()
        if control:
            with torch.no_grad():
                torch.compile(model, backend="eager")(batches[0])
            torch.compiler.reset()
            gc.collect()
            series.append({"cycle": i + 1, "seconds": time.perf_counter() - start, "rss_mb": rss_mb()})
            continue
        profile = tc.calibrate(model, batches, tc.CalibrationConfig(progress=False, budget=0.5))
        fast = torch.compile(model, backend="tardis", options={"profile": profile})
        with torch.no_grad():
            fast(batches[0])
        report = tc.explain(model, batches[0], profile=profile, inner="eager")
        assert report.ffns and all(r.status == "rewritten" for r in report.ffns), "explain found nothing"
        del fast, profile, report
        torch.compiler.reset()
        gc.collect()
        series.append({"cycle": i + 1, "seconds": time.perf_counter() - start, "rss_mb": rss_mb()})
        print(f"cycle {i + 1:3d}: {series[-1]['seconds']:.2f} s, {series[-1]['rss_mb']:.0f} MB", flush=True)
    return series


def growth(series: list[dict], key: str) -> dict:
    """Mean of ``key`` over the first and the last quarter of the series."""
    q = max(1, len(series) // 4)
    first, last = statistics.mean(r[key] for r in series[:q]), statistics.mean(r[key] for r in series[-q:])
    return {"first_quarter": first, "last_quarter": last, "ratio": last / first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--per-call", type=int, default=100)
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--control", action="store_true",
                        help="only the cycles, with plain torch.compile(backend='eager') and no tardis")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.control:
        series = cycle_soak(args.cycles, control=True)
        g = growth(series, "rss_mb")
        print(f"control rss: first quarter {g['first_quarter']:.1f} MB, last quarter {g['last_quarter']:.1f} MB, "
              f"{(series[-1]['rss_mb'] - series[0]['rss_mb']) / max(1, len(series) - 1):.2f} MB per cycle")
        return
    decode = decode_soak(args.steps, args.per_call)
    cycles = cycle_soak(args.cycles)
    summary = {"decode_ms_per_step": growth(decode, "ms_per_step"), "decode_rss_mb": growth(decode, "rss_mb"),
               "cycle_seconds": growth(cycles, "seconds"), "cycle_rss_mb": growth(cycles, "rss_mb")}
    for name, g in summary.items():
        print(f"{name}: first quarter {g['first_quarter']:.2f}, last quarter {g['last_quarter']:.2f} "
              f"(x{g['ratio']:.3f})")
    path = write_json("soak.json", {**machine(), "args": vars(args), "decode": decode, "cycles": cycles,
                                    "summary": summary})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
