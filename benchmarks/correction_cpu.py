"""CPU candidates for the flagged-neuron correction primitives, timed side by side.

    nice -n 5 python benchmarks/correction_cpu.py --threads 1   # the table (~8 min, 2 busy cores)
    python benchmarks/correction_cpu.py --quick                 # MiniLM shape, 3 rounds: smoke run

For each cache state, shape, dtype, token count T, fraction k/m of flagged neurons, weight layout
and side (gather: ``x @ w[idx].T``; scatter: ``delta @ w[idx]``), every applicable candidate is
timed in interleaved rounds (round r times candidates A, B, C, ... once each, so load from other
processes on a shared machine hits all of them alike); the table reports the per-call median over
rounds. Each candidate's output is checked against a float64 reference before it is timed.

Cache states: ``cold`` reads a buffer three times the last-level cache and then makes the same
call on a decoy weight before every timed call, so the weight is cold but code, allocator and
activations are warm, as in the forward pass of a model whose FFN weights do not fit in cache;
``warm`` times a call right after an identical one, as for a model whose weights stay cached
(MiniLM's six FFNs are 28 MiB in float32, the L3 here is 32 MiB).

Layouts: ``rows`` = the neuron-major view is contiguous (nn.Linear's W1, Conv1D's W2);
``cols`` = it is the transpose of a contiguous matrix (nn.Linear's W2, Conv1D's W1). Candidate
"dispatch" is the public function in tardis_compiler.runtime.correction. idx is sorted (what
``torch.nonzero`` of a guard mask gives).

Writes benchmarks/results/correction_cpu.json: every timing, the per-case winners, and for the
cols layout what a cached contiguous (rows) copy would buy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install
from tardis_compiler.runtime.correction import gather_rows_matmul, scatter_rows_matmul  # noqa: E402

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
KEY = ("cache", "shape", "frac", "T", "dtype", "side", "layout")


# ---- candidates: (name, layouts it applies to, fn(a, w, idx)); w is the (m, n) neuron-major view
def _cols_index(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return idx.expand(w.shape[1], idx.numel())  # stride-0 rows: no (n, k) index is materialised


def _rows_index(w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return idx[:, None].expand(idx.numel(), w.shape[1])


GATHER: list[tuple[str, tuple[str, ...], Fn]] = [
    ("index_select+mm", ("rows", "cols"), lambda x, w, i: F.linear(x, w.index_select(0, i))),
    ("w[idx]+mm", ("rows", "cols"), lambda x, w, i: F.linear(x, w[i])),
    ("dense_mm+select", ("rows", "cols"), lambda x, w, i: F.linear(x, w).index_select(1, i)),
    ("colsT.index_select(1)+mm", ("cols",), lambda x, w, i: x @ w.T.index_select(1, i)),
    ("colsT.gather(1)+mm", ("cols",), lambda x, w, i: x @ w.T.gather(1, _cols_index(w, i))),
    ("gather(0)+mm", ("cols",), lambda x, w, i: F.linear(x, w.gather(0, _rows_index(w, i)))),
    ("dispatch", ("rows", "cols"), gather_rows_matmul),
]


def _dense_scatter(d: torch.Tensor, w: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    return d.new_zeros(d.shape[0], w.shape[0]).index_copy_(1, i, d) @ w


def _embedding_bag(d: torch.Tensor, w: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    return F.embedding_bag(i.expand(d.shape[0], i.numel()), w, per_sample_weights=d, mode="sum")


SCATTER: list[tuple[str, tuple[str, ...], Fn]] = [
    ("index_select+mm", ("rows", "cols"), lambda d, w, i: d @ w.index_select(0, i)),
    ("w[idx]+mm", ("rows", "cols"), lambda d, w, i: d @ w[i]),
    ("embedding_bag", ("rows", "cols"), _embedding_bag),
    ("dense_scatter+mm", ("rows", "cols"), _dense_scatter),
    ("colsT.index_select(1)+mm", ("cols",), lambda d, w, i: F.linear(d, w.T.index_select(1, i))),
    ("colsT.gather(1)+mm", ("cols",),
     lambda d, w, i: F.linear(d, w.T.gather(1, _cols_index(w, i)))),
    ("gather(0)+mm", ("cols",), lambda d, w, i: d @ w.gather(0, _rows_index(w, i))),
    ("dispatch", ("rows", "cols"), scatter_rows_matmul),
]


def _time_interleaved(fns: dict[str, tuple[Callable[[], object], Callable[[], object]]],
                      rounds: int, flush: torch.Tensor | None) -> dict[str, list[float]]:
    """Seconds per call of each fn: one timed call per candidate per round, interleaved.

    Each fn comes with a decoy: the same call on a same-shaped weight elsewhere in memory. Warm:
    the timed call follows an untimed call of itself. Cold: it follows a read of ``flush`` (which
    evicts everything) and then the decoy, which re-warms the code paths, the allocator, x and
    idx but not this weight: a bare flush also evicts the interpreter's and torch's own state and
    adds ~50-150 us to every call (measured), which a real forward pass does not pay.
    """
    for f, decoy in fns.values():
        f(), decoy()  # first-call paths
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (f, decoy) in fns.items():
            if flush is None:
                f()
            else:
                flush.sum()  # read-only: evicts without leaving dirty lines to write back
                decoy()
            t0 = time.perf_counter()
            f()
            samples[name].append(time.perf_counter() - t0)
    return samples


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 3e-2


def run(caches: list[str], shapes: list[tuple[str, int, int]], fracs: list[float],
        tokens: list[int], dtypes: list[torch.dtype], rounds: int,
        slow_cap_s: float = 0.2) -> list[dict]:
    """Time every case; returns one record per (case, candidate)."""
    flush = torch.zeros(24 * 2**20)  # 96 MiB, 3x the 32 MiB L3 of the machine measured
    records = []
    for cache in caches:
        gen = torch.Generator().manual_seed(0)
        for shape_name, d, m in shapes:
            for dtype in dtypes:
                # One weight per layout, (m, n) neuron-major views with n = d, and a decoy of each.
                w_rows, decoy_rows = (torch.randn(m, d, generator=gen).to(dtype) for _ in "ab")
                w_cols, decoy_cols = (torch.randn(d, m, generator=gen).to(dtype).T for _ in "ab")
                for frac in fracs:
                    k = max(1, round(frac * m))
                    idx = torch.randperm(m, generator=gen)[:k].sort().values
                    for T in tokens:
                        x = torch.randn(T, d, generator=gen).to(dtype)
                        delta = torch.randn(T, k, generator=gen).to(dtype)
                        for side, cands, a in (("gather", GATHER, x), ("scatter", SCATTER, delta)):
                            for layout, w, wd in (("rows", w_rows, decoy_rows),
                                                  ("cols", w_cols, decoy_cols)):
                                case = dict(cache=cache, shape=shape_name, d=d, m=m, k=k, frac=frac,
                                            T=T, dtype=str(dtype).split(".")[-1], side=side,
                                            layout=layout)
                                cold_flush = flush if cache == "cold" else None
                                records += _time_case(case, cands, a, w, wd, idx, rounds,
                                                      cold_flush, slow_cap_s)
                                _print_case(records, case)
    return records


def _time_case(case: dict, cands: list, a: torch.Tensor, w: torch.Tensor, wd: torch.Tensor,
               idx: torch.Tensor, rounds: int, flush: torch.Tensor | None,
               slow_cap_s: float) -> list[dict]:
    ref = (a.double() @ w.double()[idx].T if case["side"] == "gather"
           else a.double() @ w.double()[idx])
    out_records, fns = [], {}
    for name, layouts, fn in cands:
        if case["layout"] not in layouts:
            continue
        f = (lambda fn=fn: fn(a, w, idx))
        t0 = time.perf_counter()
        out = f()
        first = time.perf_counter() - t0
        err = (out.double() - ref).abs().max().item()
        assert err <= _tolerance(a.dtype) * (ref.abs().max().item() + 1e-6), (name, case, err)
        if first > slow_cap_s:
            # e.g. embedding_bag on a transposed view at T=16 takes ~1 s: one call is enough
            # to rule it out, and repeating it would stall the run.
            out_records.append(dict(case, candidate=name, median_us=first * 1e6, rounds=1))
        else:
            fns[name] = (f, lambda fn=fn: fn(a, wd, idx))
    for name, s in _time_interleaved(fns, rounds, flush).items():
        out_records.append(dict(case, candidate=name, median_us=statistics.median(s) * 1e6,
                                rounds=len(s)))
    return out_records


def _key(r: dict) -> tuple:
    return tuple(r[k] for k in KEY)


def _print_case(records: list[dict], case: dict) -> None:
    rows = sorted((r for r in records if _key(r) == _key(case)), key=lambda r: r["median_us"])
    cells = "  ".join(f"{r['candidate']}={r['median_us']:.0f}" for r in rows)
    print(f"{case['cache']:>4} {case['shape']:>11} k/m={case['frac']:<4} T={case['T']:<3} "
          f"{case['dtype']:>8} {case['side']:>7} {case['layout']:>4} | {cells}", flush=True)


def summarize(records: list[dict]) -> list[dict]:
    """Per case: fastest candidate, the dispatch time, and (cols) the best time with a rows copy."""
    cases: dict[tuple, list[dict]] = {}
    for r in records:
        cases.setdefault(_key(r), []).append(r)
    out = []
    for key, rs in cases.items():
        real = [r for r in rs if r["candidate"] != "dispatch"]
        best = min(real, key=lambda r: r["median_us"])
        times = {r["candidate"]: r["median_us"] for r in rs}
        row = dict(zip(KEY, key))
        row.update(best=best["candidate"], best_us=best["median_us"],
                   dispatch_us=times.get("dispatch"),
                   index_select_mm_us=times["index_select+mm"],
                   speedup_vs_index_select_mm=times["index_select+mm"] / best["median_us"])
        out.append(row)
    by_key = {tuple(r[k] for k in KEY): r for r in out}
    for r in out:
        if r["layout"] == "cols":
            rows = by_key[tuple(r[k] for k in KEY[:-1]) + ("rows",)]
            r["rows_copy_best_us"] = rows["best_us"]
            r["rows_copy_speedup"] = r["best_us"] / rows["best_us"]
    return out


def _print_summary(summary: list[dict]) -> None:
    print("\nwinners, us. 'vs isel' = index_select+mm / best; 'copy x' = best cols / best rows "
          "(what a cached contiguous copy buys); dispatch = the public function")
    print(f"{'cache':>5} {'shape':>11} {'k/m':>5} {'T':>3} {'dtype':>8} {'side':>7} {'lay':>4} "
          f"{'best':>25} {'best_us':>8} {'dispatch':>8} {'vs isel':>7} {'copy x':>6}")
    for r in summary:
        cp = f"{r['rows_copy_speedup']:.1f}" if "rows_copy_speedup" in r else ""
        print(f"{r['cache']:>5} {r['shape']:>11} {r['frac']:>5} {r['T']:>3} {r['dtype']:>8} "
              f"{r['side']:>7} {r['layout']:>4} {r['best']:>25} {r['best_us']:>8.0f} "
              f"{r['dispatch_us']:>8.0f} {r['speedup_vs_index_select_mm']:>7.2f} {cp:>6}")


def _round(v: object) -> object:
    return round(v, 2) if isinstance(v, float) else v  # us to 0.01: far below the noise


def _to_json(result: dict) -> str:
    """One JSON object per line for each list entry: diffable and far smaller than indented."""
    result = {key: [{k: _round(x) for k, x in v.items()} for v in value]
              if isinstance(value, list) else value for key, value in result.items()}
    parts = []
    for key, value in result.items():
        if isinstance(value, list):
            body = ",\n".join("  " + json.dumps(v) for v in value)
            parts.append(f'"{key}": [\n{body}\n]')
        else:
            parts.append(f'"{key}": {json.dumps(value)}')
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="MiniLM shape only, 3 rounds")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--cache", choices=["cold", "warm", "both"], default="both")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", type=Path,
                   default=Path(__file__).resolve().parent / "results" / "correction_cpu.json")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [("d2048_m8192", 2048, 8192), ("minilm", 384, 1536)]
    rounds = args.rounds
    if args.quick:
        shapes, rounds = [("minilm", 384, 1536)], 3
    caches = ["cold", "warm"] if args.cache == "both" else [args.cache]
    t0, load_before = time.time(), os.getloadavg()
    records = run(caches, shapes, [0.05, 0.15, 0.3], args.tokens, [torch.float32, torch.bfloat16],
                  rounds)
    summary = summarize(records)
    _print_summary(summary)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.machine(),
                processor=platform.processor(), python=platform.python_version(), rounds=rounds,
                tokens=args.tokens, caches=caches, wall_s=round(time.time() - t0, 1),
                cpus=os.cpu_count(), loadavg_1m_before_after=[load_before[0], os.getloadavg()[0]],
                when=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                note="median per-call time over interleaved rounds; idx sorted; "
                     "shared 2-core machine")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(_to_json(dict(meta=meta, summary=summary, records=records)))
    print(f"\nwrote {args.out} ({len(records)} timings, {meta['wall_s']} s)")


if __name__ == "__main__":
    main()
