"""tardis checkpoints served by vLLM against the dense checkpoint (issue 20): SmolLM2-135M, decode
tokens/s at batch 1, throughput at batches 8 and 32, start-up time, with the HF numbers and the
held-out perplexity of the same checkpoints beside them.

Run it in the vLLM venv (``.ci/install-vllm``)::

    .venv-vllm/bin/python benchmarks/vllm_serve.py                      # results/vllm_serve.json
    .venv-vllm/bin/python benchmarks/vllm_serve.py --quick              # smoke: 1 round, 8 tokens, eager
    .venv-vllm/bin/python benchmarks/vllm_serve.py --rows dense tardis-0.5 tardis-0.5-keep

Rows: ``dense`` (the bf16 model as saved by transformers), ``tardis-<budget>`` (``tardis compress
smollm2 --budget b``, int8 guarded rows), ``tardis-<budget>-q8`` / ``-q4`` (quantized packs, ``--weights
int8`` / ``int4``),
``tardis-<budget>-keep`` (``--keep-dense``: batches above a few tokens run the dense FFN),
``tardis-<budget>-rows`` (``--bundles dense``: bf16 guarded rows, so batches above a few tokens run every
bundled neuron exact from the pack, no dense weights kept). Each
checkpoint is built once (cached under ``~/.cache/tardis_compiler/vllm_bench``).

Each measurement runs in a fresh process (one vLLM engine per process, as a server would), the rows
taking turns round after round (interleaved); numbers are medians over rounds with min and max.
Per row and round: ``load_s`` (``LLM(...)`` construction: weights, plugin checks, compile), then
greedy generation of ``--new-tokens`` tokens (``ignore_eos``) for batch 1 (one prompt), 8 and 32
(as many prompts at once): tokens/s = batch x new tokens / wall time, prefill of the short held-out
prompts included. vLLM's default compiled mode unless ``--eager``. The HF row of a checkpoint is the
transformers model of the same folder, batch 1, eager, same prompts; PPL is the HF model's on
held-out Wikipedia windows (every token through the packs).

The physical limit: a batch-1 decode step reads every weight once, except that a compressed FFN reads
its pack's measured ``read_bytes`` (the checkpoint's report: Wf, the guard, the flagged neurons'
rows at calibration's flag rate) instead of its stored tensors. ``MB/token`` is that sum, and the
ideal batch-1 tokens/s is the single-thread read bandwidth (measured here, vLLM's engine computes on
one thread) divided by it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("TARDIS_CACHE_DIR") or Path.home() / ".cache" / "tardis_compiler") / "vllm_bench"
PROMPT_TOKENS = 32


def _row_spec(name: str) -> dict:
    """``dense`` / ``tardis-<budget>[-q8|-q4|-keep|-rows]`` -> how to build that checkpoint (``rows``: the
    guarded neurons' bundles in bf16, ``bundles="dense"``, so batches run every bundle exact)."""
    if name == "dense":
        return {"budget": None}
    parts = name.split("-")
    quantized = {"q8": "int8", "q4": "int4"}
    if parts[0] != "tardis" or len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in (*quantized, "keep",
                                                                                                  "rows")):
        raise SystemExit(f"unknown row {name!r}: dense, tardis-<budget>, tardis-<budget>-q8, tardis-<budget>-q4, "
                         "tardis-<budget>-keep or tardis-<budget>-rows")
    return {"budget": float(parts[1]), "weights": quantized.get(parts[2]) if len(parts) == 3 else None,
            "keep_dense": parts[2:] == ["keep"], "bundles": "dense" if parts[2:] == ["rows"] else "int8"}


def build(name: str, dtype: str) -> Path:
    """The checkpoint of row ``name`` in ``dtype``, built on first use."""
    folder = CACHE / f"{name}-{dtype}"
    if (folder / "config.json").exists():
        return folder
    import torch

    from tardis_compiler.eval.models import load_model
    from tardis_compiler.hf.checkpoint import compress_pretrained

    spec = _row_spec(name)
    if spec["budget"] is None:
        loaded = load_model("smollm2", dtype=getattr(torch, dtype))
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    else:
        compress_pretrained("smollm2", folder, spec["budget"], dtype=getattr(torch, dtype), progress=False,
                            weights=spec["weights"], keep_dense=spec["keep_dense"], bundles=spec["bundles"])
    return folder


def bytes_per_token(folder: Path) -> float:
    """Bytes a batch-1 decode step reads from the checkpoint in ``folder`` (tied tensors once)."""
    stored: dict[str, int] = {}
    for file in folder.glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        stored.update({k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"})
    total = float(sum(stored.values()))
    modules = json.loads((folder / "config.json").read_text()).get("quantization_config", {}).get("modules", {})
    for spec in modules.values():
        report = spec["compressed"]
        prefix = report["target"] + "."
        total += report["read_bytes"] - sum(size for name, size in stored.items() if name.startswith(prefix))
    return total


def read_bandwidth_gbps(threads: int = 1) -> float:
    """GB/s of a large read on ``threads`` threads, measured now (benchmarks/bandwidth.py)."""
    import torch
    from bandwidth import measure

    before = torch.get_num_threads()
    try:
        return measure(threads, 256, 7)["read_GBps"]
    finally:
        torch.set_num_threads(before)


def prompts(folder: Path, count: int) -> list[list[int]]:
    """``count`` held-out prompts of ``PROMPT_TOKENS`` tokens (Wikipedia text calibration never saw)."""
    from transformers import AutoTokenizer

    from tardis_compiler.eval.corpus import evaluation_windows

    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = evaluation_windows(tokenizer, context_length=PROMPT_TOKENS, num_windows=count)
    return [w.tolist() for w in windows]


def vllm_worker(folder: Path, dtype: str, batches: list[int], new_tokens: int, eager: bool) -> dict:
    """One engine in this process: its start-up time and tokens/s per batch size."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ids = prompts(folder, max(batches))
    start = time.perf_counter()
    llm = LLM(model=str(folder), dtype=dtype, enforce_eager=eager, max_model_len=256, seed=0)
    load_s = time.perf_counter() - start
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=ids[0])], SamplingParams(max_tokens=4, temperature=0),
                 use_tqdm=False)  # warm-up
    out = {"load_s": load_s}
    for batch in batches:
        group = [TokensPrompt(prompt_token_ids=p) for p in ids[:batch]]
        start = time.perf_counter()
        results = llm.generate(group, params, use_tqdm=False)
        wall = time.perf_counter() - start
        produced = sum(len(r.outputs[0].token_ids) for r in results)
        out[f"batch{batch}_tok_s"] = produced / wall
    return out


def hf_worker(folder: Path, dtype: str, new_tokens: int, ppl_windows: int) -> dict:
    """The transformers model of the same folder: batch-1 greedy decode tokens/s and held-out PPL."""
    import torch
    import transformers as T

    from tardis_compiler.eval.corpus import evaluation_windows, special_tokens
    from tardis_compiler.eval.metrics import perplexity

    torch_dtype = getattr(torch, dtype)
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).eval()
    ids = torch.tensor([prompts(folder, 1)[0]])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        wall = time.perf_counter() - start
    tokenizer = T.AutoTokenizer.from_pretrained(folder)
    windows = evaluation_windows(tokenizer, context_length=512, num_windows=ppl_windows)
    ppl = perplexity(model, windows, special_tokens(tokenizer)[0]).value
    return {"hf_batch1_tok_s": (out.shape[1] - ids.shape[1]) / wall, "ppl": ppl}


def _spawn(args: argparse.Namespace, mode: str, folder: Path) -> dict:
    cmd = [sys.executable, __file__, f"--worker={mode}", f"--folder={folder}", f"--dtype={args.dtype}",
           f"--new-tokens={args.new_tokens}", f"--ppl-windows={args.ppl_windows}",
           "--batches", *map(str, args.batches)] + (["--eager"] if args.eager else [])
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{mode} worker on {folder} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=["dense", "tardis-0.3", "tardis-0.5", "tardis-0.7",
                                                      "tardis-0.5-q8", "tardis-0.5-keep"])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ppl-windows", type=int, default=16)
    parser.add_argument("--eager", action="store_true", help="enforce_eager (no compile)")
    parser.add_argument("--quick", action="store_true", help="1 round, 8 tokens, 2 PPL windows, eager")
    parser.add_argument("--out", help="name of the JSON written under results/ (default: vllm_serve[-quick])")
    parser.add_argument("--worker", choices=["vllm", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        folder = Path(args.folder)
        result = (vllm_worker(folder, args.dtype, args.batches, args.new_tokens, args.eager) if args.worker == "vllm"
                  else hf_worker(folder, args.dtype, args.new_tokens, args.ppl_windows))
        print(json.dumps(result), flush=True)
        return
    if args.quick:
        args.rounds, args.new_tokens, args.ppl_windows, args.eager = 1, 8, 2, True

    sys.path.insert(0, str(HERE))
    from common import OutsideLoad, machine, write_json

    folders = {name: build(name, args.dtype) for name in args.rows}
    gbps = read_bandwidth_gbps(1)
    runs: dict[str, list[dict]] = {name: [] for name in args.rows}
    loads = []
    for round_ in range(args.rounds):
        order = args.rows[round_ % len(args.rows):] + args.rows[:round_ % len(args.rows)]  # rotate: interleaved
        with OutsideLoad() as load:
            for name in order:
                runs[name].append(_spawn(args, "vllm", folders[name]))
                print(name, round_, json.dumps(runs[name][-1]), flush=True)
        loads.append(load.record())
    hf = {name: _spawn(args, "hf", folders[name]) for name in args.rows if not name.endswith("-keep")}
    table = {}
    for name, results in runs.items():
        table[name] = {key: _summary([r[key] for r in results]) for key in results[0]}
        table[name].update(hf.get(name, {}))
        table[name]["MB_per_token"] = bytes_per_token(folders[name]) / 1e6
        table[name]["ideal_batch1_tok_s"] = gbps * 1e3 / table[name]["MB_per_token"]
    dense = table.get("dense")
    lines = [f"vLLM {args.dtype}, {'eager' if args.eager else 'compiled'}, {args.new_tokens} new tokens, "
             f"{args.rounds} rounds (median [min, max]); read bandwidth {gbps:.1f} GB/s (1 thread)",
             "| row | load s | " + " | ".join(f"batch {b} tok/s" for b in args.batches)
             + " | MB/token | ideal batch 1 tok/s | HF batch 1 tok/s | PPL |",
             "|---|---|" + "---|" * len(args.batches) + "---|---|---|---|"]
    for name, row in table.items():
        load_ratio = f" ({row['load_s']['median'] / dense['load_s']['median']:.2f}x)" if dense else ""
        cells = [f"{row['load_s']['median']:.1f}{load_ratio}"]
        for b in args.batches:
            s = row[f"batch{b}_tok_s"]
            ratio = f" ({s['median'] / dense[f'batch{b}_tok_s']['median']:.2f}x)" if dense else ""
            cells.append(f"{s['median']:.1f} [{s['min']:.1f}, {s['max']:.1f}]{ratio}")
        cells += [f"{row['MB_per_token']:.0f}", f"{row['ideal_batch1_tok_s']:.0f}",
                  f"{row['hf_batch1_tok_s']:.1f}" if "hf_batch1_tok_s" in row else "-",
                  f"{row['ppl']:.2f}" if "ppl" in row else "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    out = args.out or ("vllm_serve" if not args.quick else "vllm_serve-quick")
    path = write_json(f"{out}.json",
                      {"machine": machine(), "args": vars(args), "outside_load": loads, "rows": table, "table": lines})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
