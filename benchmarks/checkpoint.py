"""The deploy path on SmolLM2-135M: compress_ -> save_pretrained -> from_pretrained -> generate.

Per (budget, resident cap, how the guarded rows are held): calibrate once (one recording shared by every fit), compress a copy of
the dense model, save it, reload it, check the reloaded logits equal the in-memory ones, then
measure what a user gets: FFN bytes held and read (fractions of dense), checkpoint size, perplexity
on held-out Wikipedia windows (every token through the packs), and greedy decode tokens/s at batch
1 beside the dense model in the same dtype (inductor; ``--eager`` adds eager), and at
``--backend-budgets`` the same profile through ``backend="tardis"``, which keeps the dense
weights; interleaved, medians. The
bytes-bound ideal scales the dense FFN time (dense minus FFNs-removed) by the bytes read.

    python benchmarks/checkpoint.py                       # bf16: 0.3, 0.5, 0.7 (int8 rows), 0.5 dense rows
    python benchmarks/checkpoint.py --configs 0.5:0.9:dense 0.5 --dtype float32   # BUDGET[:RESIDENT[:ROWS]]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch
import transformers as T

import tardis_compiler as tc
from common import machine, write_json
from smollm2_decode import compile_forward, without_ffns


def parse_config(text: str) -> tuple[float, float | None, str]:
    """BUDGET[:RESIDENT[:BUNDLES]], e.g. 0.5, 0.5:0.9, 0.5:none:dense."""
    budget, resident, bundles = (text.split(":") + ["none", "int8"])[:3]
    return float(budget), (float(resident) if resident != "none" else None), bundles


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["0.3", "0.5", "0.7", "0.5:none:dense"],
                        help="budget:resident pairs (resident 'none': no cap)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--eager", action="store_true", help="also time each checkpoint eagerly")
    parser.add_argument("--backend-budgets", nargs="*", type=float, default=[0.5],
                        help="budgets (int8 rows, uncapped) also timed through backend='tardis'")
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="name of the JSON written under results/ (default: checkpoint-DTYPE)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tardis_compiler.eval.corpus import calibration_batches, evaluation_windows, special_tokens
    from tardis_compiler.eval.metrics import perplexity
    from tardis_compiler.eval.models import load_smollm2

    dtype = getattr(torch, args.dtype)
    dense, tok = load_smollm2()
    # The dense model as from_pretrained(dtype=...) gives it, which the reloaded checkpoints are
    # compared with: ``.to(bf16)`` would also round rotary inv_freq, which from_pretrained keeps fp32.
    dense_dir = tempfile.mkdtemp(prefix="tardis-dense-")
    dense.to(dtype).save_pretrained(dense_dir)
    dense = T.AutoModelForCausalLM.from_pretrained(dense_dir, dtype=dtype).eval()
    dense_size = folder_bytes(dense_dir)
    prefix = special_tokens(tok)[0]
    windows = evaluation_windows(tok, context_length=512, num_windows=max(args.prompts, args.ppl_windows))
    prompts = [torch.cat([torch.tensor(prefix, dtype=torch.long), w[:32]])[None] for w in windows[:args.prompts]]
    batches = calibration_batches(tok, context_length=512, num_batches=args.calibration_batches)
    started = time.perf_counter()
    recorder = tc.record(dense, batches, tc.CalibrationConfig(progress=False))
    record_s = time.perf_counter() - started
    print(f"recorded {len(batches)} windows in {record_s:.0f} s", flush=True)

    variants = {"dense eager": (dense, dense.forward), "dense inductor": (dense, compile_forward(dense))}
    bare = without_ffns(dense).eval()
    variants["dense inductor, FFNs removed"] = (bare, compile_forward(bare))
    info: dict[str, dict] = {name: {"kind": "dense", "read": 1.0, "held": 1.0} for name in variants}
    info["dense inductor, FFNs removed"].update(kind="ceiling", read=0.0, held=0.0)
    for text in args.configs:
        budget, resident, bundles = parse_config(text)
        begin = time.perf_counter()
        config = tc.CalibrationConfig(progress=False, budget=budget, resident=resident, bundles=bundles)
        profile = recorder.fit(f"checkpoint benchmark: {len(batches)} windows", config)
        fit_s = time.perf_counter() - begin
        model = copy.deepcopy(dense)
        report = tc.compress_(model, profile, prompts[0])
        folder = tempfile.mkdtemp(prefix="tardis-ckpt-")
        model.save_pretrained(folder)
        reloaded = T.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        with torch.no_grad():
            same = torch.equal(reloaded(windows[0][None, :64]).logits, model(windows[0][None, :64]).logits)
        name = f"tardis {budget} resident {resident or 'uncapped'} {bundles} rows"
        suffixes = ("eager", "inductor") if args.eager else ("inductor",)
        if args.eager:
            variants[f"{name} eager"] = (reloaded, reloaded.forward)
        variants[f"{name} inductor"] = (reloaded, compile_forward(reloaded))
        for suffix in suffixes:
            info[f"{name} {suffix}"] = {"kind": "tardis", "budget": budget, "resident_cap": resident, "bundles": bundles,
                                        "read": report.read_fraction(), "held": report.resident_fraction(),
                                        "checkpoint_fraction": folder_bytes(folder) / dense_size,
                                        "reload_equal": same, "fit_s": fit_s}
        if resident is None and budget in args.backend_budgets and bundles == "int8":
            # the same profile through the backend, which keeps the dense weights
            backend = f"backend {budget} inductor"
            variants[backend] = (dense, compile_forward(dense, backend="tardis", options={"profile": profile}))
            info[backend] = {"kind": "tardis-backend", "budget": budget, "read": report.read_fraction(),
                             "held": 1.0 + report.resident_fraction(), "fit_s": fit_s}
        print(f"{name}: held {report.resident_fraction():.3f}, read {report.read_fraction():.3f}, checkpoint "
              f"{folder_bytes(folder) / dense_size:.3f} of dense, reload equal {same}, fit {fit_s:.0f} s", flush=True)

    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=tok.eos_token_id)

    def run(model, forward, prompt):
        original, model.forward = model.forward, forward
        try:
            with torch.no_grad():
                start = time.perf_counter()
                model.generate(prompt, **generate)
                return time.perf_counter() - start
        finally:
            model.forward = original

    ppl_of: dict[int, float] = {}  # per model (eager and inductor variants share it)
    for name, (model, forward) in variants.items():
        run(model, forward, prompts[0])  # warm up (compiles)
        if info[name]["kind"] in ("dense", "tardis") and id(model) not in ppl_of:
            ppl_of[id(model)] = perplexity(model, windows[:args.ppl_windows], prefix).value
            print(f"{name}: PPL {ppl_of[id(model)]:.3f}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for prompt in prompts:
            for name, (model, forward) in variants.items():  # interleaved
                times[name].append(run(model, forward, prompt))

    best_dense = min(statistics.median(times[n]) for n in ("dense eager", "dense inductor"))
    rest = statistics.median(times["dense inductor, FFNs removed"])
    rows = []
    for name in variants:
        seconds = statistics.median(times[name])
        row = {"variant": name, **info[name], "tokens_per_s": args.new_tokens / seconds,
               "vs_best_dense": best_dense / seconds,
               "ppl": ppl_of.get(id(variants[name][0])) if info[name]["kind"] in ("dense", "tardis") else None}
        # The backend row runs prefill (> 4 tokens per call in bf16) on the dense weights: not the
        # checkpoint's perplexity, so none is reported for it.
        if info[name]["kind"] in ("tardis", "tardis-backend"):
            row["ideal_tokens_per_s"] = args.new_tokens / (rest + (best_dense - rest) * info[name]["read"])
        rows.append(row)
        print(f"{name:<44} {row['tokens_per_s']:7.1f} tok/s  x{row['vs_best_dense']:.2f}  held {info[name]['held']:.3f}"
              f"  read {info[name]['read']:.3f}  PPL {row['ppl'] if row['ppl'] else float('nan'):.3f}")
    result = {**machine(), "args": vars(args), "dtype": args.dtype, "record_s": record_s,
              "dense_checkpoint_bytes": dense_size, "rows": rows}
    out = args.out or f"checkpoint-{args.dtype}"
    print(f"wrote {write_json(f'{out}.json', result)}")


if __name__ == "__main__":
    main()
