"""The physical limit on this machine: GB/s of a large read and of a large GEMV, 1 and 2 threads,
float32 and bfloat16. Every speed table's "bytes-bound ideal" is judged against these.

Arrays are 256 MB (far beyond the L3), medians of 20 runs after warm-up:
- read: ``a.sum()`` over a float32 array (bytes = numel * 4);
- GEMV: ``torch.mv(W, x)`` with W of 256 MB in the dtype (bytes = W's);
- the L3 knee: ``sum`` over 1-64 MB arrays, to show where "cold" begins.

    python benchmarks/bandwidth.py            # writes benchmarks/results/bandwidth.json
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

RESULTS = os.path.join(os.path.dirname(__file__), "results")
MB = 1 << 20


def _median_s(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(threads: int, size_mb: int, repeats: int) -> dict:
    """GB/s of read and GEMV at ``threads`` threads."""
    torch.set_num_threads(threads)
    out = {"threads": threads}
    a = torch.rand(size_mb * MB // 4)
    out["read_GBps"] = a.numel() * 4 / _median_s(a.sum, repeats) / 1e9
    del a
    for dtype in (torch.float32, torch.bfloat16):
        elem = torch.empty(0, dtype=dtype).element_size()
        cols = 4096
        rows = size_mb * MB // (elem * cols)
        w = torch.randn(rows, cols).to(dtype)
        x = torch.randn(cols).to(dtype)
        out[f"gemv_{str(dtype)[6:]}_GBps"] = w.numel() * elem / _median_s(lambda: torch.mv(w, x), repeats) / 1e9
        del w
    knee = {}
    for mb in (1, 4, 16, 32, 64):
        a = torch.rand(mb * MB // 4)
        knee[mb] = a.numel() * 4 / _median_s(a.sum, repeats * 5) / 1e9
    out["read_GBps_by_MB"] = knee
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(RESULTS, "bandwidth.json"))
    args = parser.parse_args()
    before = torch.get_num_threads()
    rows = [measure(t, args.size_mb, args.repeats) for t in (1, 2)]
    torch.set_num_threads(before)
    result = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs", "torch": torch.__version__, "size_mb": args.size_mb, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(markdown(result))


def markdown(result: dict) -> str:
    lines = ["| threads | read (sum) GB/s | GEMV fp32 GB/s | GEMV bf16 GB/s | read 1 / 4 / 16 / 32 / 64 MB GB/s |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        knee = " / ".join(f"{v:.1f}" for v in r["read_GBps_by_MB"].values())
        lines.append(f"| {r['threads']} | {r['read_GBps']:.1f} | {r['gemv_float32_GBps']:.1f} | "
                     f"{r['gemv_bfloat16_GBps']:.1f} | {knee} |")
    return "\n".join(lines)


def load(path: str = os.path.join(RESULTS, "bandwidth.json")) -> dict | None:
    """The last measurement, for other benchmarks' tables (None if never run)."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
