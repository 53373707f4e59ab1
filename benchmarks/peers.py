"""What a CPU user would run instead (issue 19): SmolLM2-135M greedy decode, batch 1, tokens/s and
held-out perplexity for dense bf16, torchao int8 / int4 weight-only, tardis (budgets x weight
encodings) and llama.cpp (GGUF files of the same weights at BF16 / Q8_0 / Q4_0, 1 and 2 threads).

Every row decodes the same held-out prompts to exactly ``--new-tokens`` new tokens (greedy) and
scores the same held-out windows. Rows take turns within each round (interleaved), tokens/s is
new tokens over the wall time of one generation (prefill included, as HF ``generate`` is timed),
reported as the median with min and max over all rounds and prompts. llama.cpp rows also carry
llama.cpp's own counters (prefill and decode ms, ``llama_perf_context``).

Rows (``--rows`` picks them by name, shell-style patterns, e.g. ``--rows dense 'torchao-*'``):

- ``dense``: the model in bfloat16 under inductor (the baseline);
- ``torchao-int8``: ``quantize_(model, Int8WeightOnlyConfig())`` under inductor;
- ``torchao-int4``: torchao 0.18's CPU int4 weight-only path,
  ``torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig(group_size=...)``
  (``Int4OpaqueTensor``, ``aten._weight_int4pack_mm_for_cpu``), under inductor. The stable
  ``Int4WeightOnlyConfig`` has no CPU packing format in 0.18 (its "plain" format needs the
  CUDA-only mslk package);
- ``tardis-<budget>[-<weights>]``: ``calibrate`` at ``CalibrationConfig(budget=b, weights=w)`` (16
  calibration windows, cached), ``compress_(model, profile, example, other_linears=w)``, inductor.
  A package without ``weights`` / ``other_linears`` (or without that encoding) skips the row
  and says why. ``tardis-<budget>-<weights>-r<x>`` (``--tardis-resident x``) also caps the FFN
  bytes held at ``x`` of the (quantized) dense FFN's, ``CalibrationConfig(resident=x)``;
- ``llama.cpp-<TYPE>-<n>t``: llama-cpp-python in a worker process (``peers_llama.py``) on a GGUF
  converted from the HF folder the torch rows load.

The ``bench`` extra installs the peers (see docs/PEERS.md for the exact commands; llama.cpp is
built from source). Rows whose peer is not installed are skipped with the reason.

    python benchmarks/peers.py --quick            # smoke: 8 tokens, 1 round, 2 PPL windows
    python benchmarks/peers.py                    # full: results/peers-<date>.json and .png
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import inspect
import math
import os
import statistics
import time
from datetime import date

import torch

from common import (RESULTS, OutsideLoad, allow_many_compiles, cached_profiles, compile_forward, machine,
                    weight_bytes, write_json)

#: An outside load above this share of the machine's cores (other processes' CPU time during a
#: round) makes the round's timings suspect: the table says so.
LOADED = 0.10


class Skip(Exception):
    """A row that cannot run here; the message is the recorded reason."""


class Row:
    """One benchmark row: builds itself, decodes a prompt (seconds, tokens, extra counters) and
    scores windows (summed NLL, tokens)."""

    family = "?"

    def __init__(self, name: str, info: dict | None = None) -> None:
        self.name, self.info = name, dict(info or {})
        self.skipped: str | None = None  # why it never ran
        self.failed: str | None = None  # why it stopped
        self.resident_bytes: int | None = None

    def generate(self, prompt: list[int], n: int) -> tuple[float, list[int], dict]:
        raise NotImplementedError

    def nll(self, windows: list[list[int]], prefix: list[int]) -> tuple[float, int]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class TorchRow(Row):
    """A HF model whose forward is compiled (inductor); greedy ``generate``."""

    def __init__(self, name: str, family: str, model: torch.nn.Module, tokenizer, info: dict | None = None,
                 check_tardis: bool = False) -> None:
        super().__init__(name, info)
        self.family, self.model, self.check_tardis = family, model.eval(), check_tardis
        self.resident_bytes = weight_bytes(model)
        model.forward = compile_forward(model)
        self._generate = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id)

    def generate(self, prompt, n):
        import tardis_compiler as tc

        ids = torch.tensor([prompt], dtype=torch.long)
        with torch.no_grad(), tc.collect_stats() as stats:
            start = time.perf_counter()
            out = self.model.generate(ids, max_new_tokens=n, min_new_tokens=n, **self._generate)
            seconds = time.perf_counter() - start
        if self.check_tardis and not stats.ffns:
            raise RuntimeError("no tardis op ran (did dynamo fall back to eager, or compress_ leave the FFNs dense?)")
        return seconds, out[0, len(prompt):].tolist(), {}

    def nll(self, windows, prefix):
        from tardis_compiler.eval.metrics import perplexity

        with torch.no_grad():
            p = perplexity(self.model, [torch.tensor(w) for w in windows], prefix)
        return p.nll, p.tokens


class LlamaRow(Row):
    family = "llama.cpp"

    def __init__(self, name: str, worker, path, threads: int, n_ctx: int, n_batch: int, extra_bufts,
                 info: dict) -> None:
        super().__init__(name, info)
        self.worker, self.threads = worker, threads
        answer = worker.call({"cmd": "load", "row": name, "path": str(path), "threads": threads, "n_ctx": n_ctx,
                              "n_batch": n_batch, "extra_bufts": extra_bufts})
        self.resident_bytes = answer["model_bytes"]
        self.info.update(file=str(path), file_bytes=os.path.getsize(path), **answer)

    def generate(self, prompt, n):
        answer = self.worker.call({"cmd": "generate", "row": self.name, "prompt": prompt, "n": n})
        return answer["seconds"], answer["tokens"], answer["perf"]

    def nll(self, windows, prefix):
        answer = self.worker.call({"cmd": "nll", "row": self.name, "windows": windows, "prefix": prefix})
        return answer["nll"], answer["tokens"]

    def close(self):
        self.worker.forget(self.name)


def row_names(args) -> list[str]:
    names = ["dense", "torchao-int8", "torchao-int4"]
    for w in args.tardis_weights:
        for b in args.tardis_budgets:
            names.append(f"tardis-{b:g}" + ("" if w in (None, "none") else f"-{w}"))
            names += [f"{names[-1]}-r{r:g}" for r in args.tardis_resident if w not in (None, "none")]
    for t in args.gguf_types:
        for n in args.llama_threads:
            names.append(f"llama.cpp-{t}-{n}t")
    return names


def selected(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatch(name.lower(), p.lower()) for p in patterns)


def build_torch_rows(names, base, tok, args, batches) -> list[Row]:
    """Dense, torchao and tardis rows (each its own bf16 copy of ``base``)."""
    import tardis_compiler as tc

    rows: list[Row] = []
    dense_bf16 = copy.deepcopy(base).to(torch.bfloat16).eval()
    for name in names:
        print(f"building {name}...", flush=True)
        try:
            if name == "dense":
                rows.append(TorchRow(name, "dense", copy.deepcopy(dense_bf16), tok, {"dtype": "bf16"}))
            elif name.startswith("torchao-"):
                rows.append(_torchao_row(name, dense_bf16, tok, args))
            elif name.startswith("tardis-"):
                rows.append(_tardis_row(name, dense_bf16, tok, args, batches, tc))
        except Skip as e:
            row = Row(name, {})
            row.family = "torchao" if name.startswith("torchao") else "tardis" if name.startswith("tardis") else "?"
            row.skipped = str(e)
            rows.append(row)
            print(f"{name}: skipped: {e}", flush=True)
    return rows


def _torchao_row(name, dense_bf16, tok, args) -> Row:
    try:
        import torchao
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise Skip(f"torchao is not installed ({e}); pip install tardis-compiler[bench]") from None
    model = copy.deepcopy(dense_bf16)
    # set_inductor_config=False: torchao's recommended settings are process-wide inductor state
    # (coordinate descent tuning etc., Triton/GPU-side) that would apply to every row compiled after.
    if name == "torchao-int8":
        config = Int8WeightOnlyConfig(set_inductor_config=False)
        spelling = "torchao.quantization.Int8WeightOnlyConfig(set_inductor_config=False)"
    else:
        try:
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        except ImportError as e:
            raise Skip(f"torchao {torchao.__version__} has no CPU int4 weight-only config "
                       f"(torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig): {e}") from None
        config = PrototypeInt4WeightOnlyConfig(group_size=args.int4_group_size, set_inductor_config=False)
        spelling = (f"torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig("
                    f"group_size={args.int4_group_size}, set_inductor_config=False)")
    try:
        quantize_(model, config)
        with torch.no_grad():  # one eager call: a config that cannot run on this CPU says so here
            model(torch.tensor([[1, 2, 3]]))
    except Exception as e:  # noqa: BLE001
        raise Skip(f"{spelling} does not run here: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    kinds = sorted({type(m.weight).__name__ for m in model.modules() if isinstance(m, torch.nn.Linear)})
    return TorchRow(name, "torchao", model, tok, {"dtype": "bf16", "torchao": torchao.__version__,
                                                  "config": spelling, "weight_types": kinds})


def _tardis_row(name, dense_bf16, tok, args, batches, tc) -> Row:
    parts = name.split("-")
    budget, weights = float(parts[1]), (parts[2] if len(parts) > 2 else None)
    extra = {} if weights is None else {"weights": weights}
    if len(parts) > 3:  # -r<x>: a resident cap
        extra["resident"] = float(parts[3][1:])
    if weights is not None and "other_linears" not in inspect.signature(tc.compress_).parameters:
        raise Skip(f"the installed tardis_compiler's compress_ has no other_linears (needed for weights={weights!r})")
    try:
        config = tc.CalibrationConfig(progress=False, **extra)
    except (TypeError, ValueError) as e:
        raise Skip(f"CalibrationConfig(weights={weights!r}) is not supported by the installed tardis_compiler: "
                   f"{type(e).__name__}: {e}") from None
    start = time.perf_counter()
    try:
        profile = cached_profiles("smollm2-bfloat16", dense_bf16, batches, [budget], config)[budget]
    except (TypeError, ValueError, NotImplementedError) as e:
        raise Skip(f"calibration at budget {budget}, weights={weights!r} failed: {type(e).__name__}: {e}") from None
    model = copy.deepcopy(dense_bf16)
    try:
        report = tc.compress_(model, profile, batches[0][:, :16], **({} if weights is None else
                                                                   {"other_linears": weights}))
    except (TypeError, ValueError, NotImplementedError) as e:
        raise Skip(f"compress_(..., other_linears={weights!r}) is not supported by the installed tardis_compiler: "
                   f"{type(e).__name__}: {e}") from None
    info = {"dtype": "bf16", "budget": budget, "weights": weights, "resident_cap": extra.get("resident"),
            "bytes_fraction": profile.bytes_fraction(),
            "resident_fraction": report.resident_fraction(), "read_fraction": report.read_fraction(),
            "build_seconds": time.perf_counter() - start}
    return TorchRow(name, "tardis", model, tok, info, check_tardis=True)


def build_llama_rows(names, base, args, context: int, out_name: str) -> tuple[list[Row], dict]:
    """llama.cpp rows (GGUF files made once, one worker process for all of them) and llama.cpp's
    description (version, system info, AMX handling). The worker's log (llama.cpp's own output)
    goes to ``<cache>/peers/<out_name>-llama.log``."""
    rows: list[Row] = []
    if not names:
        return rows, {}

    def skip_all(reason: str):
        for name in names:
            row = Row(name, {})
            row.family, row.skipped = "llama.cpp", reason
            rows.append(row)
        print(f"llama.cpp rows skipped: {reason}", flush=True)
        return rows, {"skipped": reason}

    try:
        import llama_cpp  # noqa: F401  (only to know it is there: the worker loads it)
    except ImportError as e:
        return skip_all(f"llama-cpp-python is not installed ({e}); see docs/PEERS.md")
    from peers_llama import LlamaWorker, WorkerDied, gguf_files, peers_cache

    types = sorted({n.split("-")[1] for n in names})
    try:
        files = gguf_files(base.name_or_path, types, source=args.llama_cpp_src, threads=args.threads)
    except Exception as e:  # noqa: BLE001
        return skip_all(f"GGUF conversion failed: {type(e).__name__}: {e}")
    log_path = peers_cache() / f"{out_name}-llama.log"
    log_path.unlink(missing_ok=True)
    worker = LlamaWorker(log_path)
    try:
        info = worker.call({"cmd": "info"})
    except RuntimeError as e:  # WorkerDied too: llama_cpp would not even load in the worker
        return skip_all(f"the llama.cpp worker did not start: {e}")
    n_batch = max(context, 64)
    n_ctx = max(context, args.prompt_tokens + args.new_tokens + 8) + 64
    for name in names:
        _, t, threads = name.split("-")
        try:
            rows.append(LlamaRow(name, worker, files[t], int(threads[:-1]), n_ctx, n_batch, args.llama_extra_bufts,
                                 {"dtype": t, "threads": int(threads[:-1])}))
        except (WorkerDied, RuntimeError) as e:
            row = Row(name, {})
            row.family, row.skipped = "llama.cpp", str(e)
            rows.append(row)
    return rows, {"version": info["version"], "system_info": info["system_info"], "log": str(log_path),
                  "amx_compiled_in": info["amx_compiled_in"], "worker": worker,
                  "files": {k: str(v) for k, v in files.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (and llama.cpp's quantize)")
    parser.add_argument("--llama-threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--context", type=int, default=512, help="PPL window length (tokens)")
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--tardis-budgets", type=float, nargs="*", default=[0.3, 0.5, 0.7])
    parser.add_argument("--tardis-weights", nargs="*", default=[None, "int8", "int4"],
                        type=lambda s: None if s.lower() == "none" else s,
                        help="weight encodings of the tardis rows: none (the model's), int8, int4")
    parser.add_argument("--tardis-resident", type=float, nargs="*", default=[],
                        help="also run each quantized tardis row with CalibrationConfig(resident=x)")
    parser.add_argument("--gguf-types", nargs="*", default=["BF16", "Q8_0", "Q4_0"])
    parser.add_argument("--int4-group-size", type=int, default=32,
                        help="torchao int4 group size (32: llama.cpp Q4_0's block)")
    parser.add_argument("--llama-extra-bufts", default="auto", type=lambda s: s if s == "auto" else s == "on",
                        help="llama.cpp's extra buffer types (weight repacking; AMX): auto (off only when "
                             "the build has AMX, which crashed here), on, off")
    parser.add_argument("--llama-cpp-src", help="an unpacked llama-cpp-python sdist's vendor/llama.cpp "
                        "(for convert_hf_to_gguf.py); default: fetched once into the cache")
    parser.add_argument("--rows", nargs="+", help="rows to run, by name or shell pattern (see --list)")
    parser.add_argument("--list", action="store_true", help="print the row names and exit")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 8 new tokens, 1 prompt, 1 round, 2 PPL windows")
    parser.add_argument("--out", help="JSON/PNG name under results/ (default peers-<date>, peers-quick-<date>)")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.prompts, args.rounds, args.ppl_windows = 8, 1, 1, 2
    names = [n for n in row_names(args) if selected(n, args.rows)]
    if args.list or not names:
        print("\n".join(row_names(args)) if args.list else "no row matches --rows; see --list")
        return
    out_name = args.out or f"peers-{'quick-' if args.quick else ''}{date.today().isoformat()}"
    torch.set_num_threads(args.threads)
    allow_many_compiles()

    from tardis_compiler.eval.corpus import calibration_batches, evaluation_windows, special_tokens
    from tardis_compiler.eval.models import load_smollm2

    base, tok = load_smollm2()
    prefix = special_tokens(tok)[0]
    windows = evaluation_windows(tok, context_length=args.context, num_windows=max(args.prompts, args.ppl_windows))
    prompts = [prefix + w[:args.prompt_tokens].tolist() for w in windows[:args.prompts]]
    ppl_windows = [w.tolist() for w in windows[:args.ppl_windows]]
    batches = (calibration_batches(tok, context_length=512, num_batches=args.calibration_windows)
               if any(n.startswith("tardis-") for n in names) else None)

    start_machine = machine()
    rows = build_torch_rows([n for n in names if not n.startswith("llama.cpp-")], base, tok, args, batches)
    llama_rows, llama_info = build_llama_rows([n for n in names if n.startswith("llama.cpp-")], base, args,
                                              args.context, out_name)
    rows += llama_rows
    worker = llama_info.pop("worker", None)
    if worker is not None:
        sample = tok.decode(prompts[0][len(prefix):])
        first = next((r for r in llama_rows if r.skipped is None), None)
        if first is not None:
            theirs = worker.call({"cmd": "tokenize", "row": first.name, "text": sample})["tokens"]
            llama_info["same_tokenization"] = theirs == tok(sample, add_special_tokens=False)["input_ids"]

    outputs: dict[str, list[list[int]]] = {}
    ppl: dict[str, dict] = {}
    for row in live(rows):  # warm up (compiles), then perplexity
        start = time.perf_counter()
        try:
            outputs[row.name] = [row.generate(p, args.new_tokens)[1] for p in prompts]
            total, count = row.nll(ppl_windows, prefix)
            ppl[row.name] = {"ppl": math.exp(total / count), "nll": total, "tokens": count}
        except Exception as e:  # noqa: BLE001  (a crashed worker, a row that cannot run: recorded)
            fail(row, e)
            continue
        print(f"{row.name}: warm-up and PPL {ppl[row.name]['ppl']:.3f} in {time.perf_counter() - start:.0f} s",
              flush=True)

    samples: dict[str, list[dict]] = {row.name: [] for row in rows}
    rounds = []
    for index in range(args.rounds):
        with OutsideLoad() as load:
            for p, prompt in enumerate(prompts):
                for row in live(rows):  # interleaved
                    try:
                        seconds, _, extra = row.generate(prompt, args.new_tokens)
                    except Exception as e:  # noqa: BLE001
                        fail(row, e)
                        continue
                    samples[row.name].append({"round": index, "prompt": p, "seconds": seconds, **extra})
        rounds.append(load.record())
        flag = "  LOADED: timings suspect" if load.share > LOADED else ""
        print(f"round {index}: outside load {load.share:.0%} of the cores, load average "
              f"{load.load_before[0]:.2f} -> {load.load_after[0]:.2f}{flag}", flush=True)
    if worker is not None:
        worker.close()

    result_rows = [summarize(row, samples[row.name], ppl.get(row.name), outputs, args) for row in rows]
    add_ratios(result_rows)
    result = {**start_machine, "machine_after": machine(), "args": {k: v for k, v in vars(args).items()},
              "rounds": rounds, "loaded": any(r["outside_share"] > LOADED for r in rounds),
              "llama_cpp": llama_info, "rows": result_rows}
    path = write_json(f"{out_name}.json", result)
    print(markdown(result))
    png = plot(result, out_name)
    print(f"wrote {path}" + (f" and {png}" if png else ""))


def live(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.skipped is None and r.failed is None]


def fail(row: Row, error: Exception) -> None:
    row.failed = f"{type(error).__name__}: {error}"
    row.close()
    print(f"{row.name}: failed: {row.failed}", flush=True)


def summarize(row: Row, samples: list[dict], ppl: dict | None, outputs: dict, args) -> dict:
    out = {"row": row.name, "family": row.family, **row.info, "resident_bytes": row.resident_bytes}
    if row.skipped or row.failed:
        out["status"] = "skipped" if row.skipped else "failed"
        out["reason"] = row.skipped or row.failed
    if ppl:
        out.update(ppl)
    if samples:
        seconds = [s["seconds"] for s in samples]  # tokens/s of the median time, as smollm2_decode.py
        out.update(tokens_per_s=args.new_tokens / statistics.median(seconds),
                   tokens_per_s_min=args.new_tokens / max(seconds), tokens_per_s_max=args.new_tokens / min(seconds),
                   samples=samples)
        decode = [s["decode_tokens"] / (s["decode_ms"] / 1e3) for s in samples if s.get("decode_ms")]
        if decode:
            out["llama_decode_tokens_per_s"] = statistics.median(decode)
    if row.name in outputs and "dense" in outputs:
        same = [_prefix_agreement(a, b) for a, b in zip(outputs[row.name], outputs["dense"])]
        out["prefix_agreement_with_dense"] = statistics.mean(same)
    return out


def _prefix_agreement(a: list[int], b: list[int]) -> float:
    """Share of generated tokens before the first disagreement."""
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(len(a), 1)


def add_ratios(rows: list[dict]) -> None:
    by = {r["row"]: r for r in rows}
    for ref, key in (("dense", "vs_dense"), ("torchao-int8", "vs_torchao_int8")):
        if "tokens_per_s" in by.get(ref, {}):
            for r in rows:
                if "tokens_per_s" in r:
                    r[key] = r["tokens_per_s"] / by[ref]["tokens_per_s"]
    if "ppl" in by.get("dense", {}):
        for r in rows:
            if "ppl" in r:
                r["ppl_delta_vs_dense"] = r["ppl"] / by["dense"]["ppl"] - 1


def markdown(result: dict) -> str:
    a = result["args"]
    load = ", ".join(f"{r['load_before'][0]:.2f}->{r['load_after'][0]:.2f} ({r['outside_share']:.0%} outside)"
                     for r in result["rounds"])
    lines = [f"SmolLM2-135M greedy decode, batch 1, {a['new_tokens']} new tokens from {a['prompts']} held-out "
             f"prompt(s) of {a['prompt_tokens']} tokens, {a['rounds']} interleaved round(s); torch at {a['threads']} "
             f"threads; PPL on {a['ppl_windows']} held-out windows of {a['context']} tokens",
             f"{result.get('cpu_model')} ({', '.join(result['cpu_isa'])}; L3 {result.get('l3_cache')}); "
             f"load average per round: {load}" + ("  **LOADED: timings suspect**" if result["loaded"] else ""), "",
             "| row | tokens/s median [min-max] | vs dense | vs torchao int8 | PPL | ΔPPL vs dense | resident MB | "
             "same tokens as dense | note |", "|---|---|---|---|---|---|---|---|---|"]

    def f(r, key, fmt):
        return format(r[key], fmt) if key in r else "-"

    for r in result["rows"]:
        speed = (f"{r['tokens_per_s']:.1f} [{r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f}]"
                 if "tokens_per_s" in r else "-")
        mb = f"{r['resident_bytes'] / 1e6:.0f}" if r.get("resident_bytes") else "-"
        delta = f"{100 * r['ppl_delta_vs_dense']:+.1f}%" if "ppl_delta_vs_dense" in r else "-"
        note = f"{r['status']}: {r['reason'][:160]}" if "status" in r else ""
        if "llama_decode_tokens_per_s" in r:
            note = f"llama.cpp decode-only {r['llama_decode_tokens_per_s']:.1f} tok/s " + note
        lines.append(f"| {r['row']} | {speed} | {f(r, 'vs_dense', '.2f')} | {f(r, 'vs_torchao_int8', '.2f')} | "
                     f"{f(r, 'ppl', '.3f')} | {delta} | {mb} | {f(r, 'prefix_agreement_with_dense', '.2f')} | "
                     f"{note.replace('|', '/')} |")
    return "\n".join(lines)


def plot(result: dict, name: str) -> str | None:
    rows = [r for r in result["rows"] if "tokens_per_s" in r and "ppl" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import FormatStrFormatter

    a = result["args"]
    torch_label = f"{a['threads']} thread{'s' * (a['threads'] > 1)}"
    style = {"dense": ("black", "*"), "torchao": ("tab:blue", "s"), "tardis": ("tab:red", "D"),
             "llama.cpp": ("tab:green", "o")}
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[tuple, list[dict]] = {}
    for r in rows:  # llama.cpp at 1 thread hollow, at more threads filled
        groups.setdefault((r["family"], r.get("threads") if r["family"] == "llama.cpp" else None), []).append(r)
    for (family, threads), mine in groups.items():
        color, marker = style.get(family, ("tab:gray", "v"))
        label = f"{family} ({threads} thread{'s' * (threads > 1)})" if threads else f"{family} ({torch_label})"
        ax.errorbar([r["tokens_per_s"] for r in mine], [r["ppl"] for r in mine],
                    xerr=[[r["tokens_per_s"] - r["tokens_per_s_min"] for r in mine],
                          [r["tokens_per_s_max"] - r["tokens_per_s"] for r in mine]],
                    fmt=marker, color=color, label=label, markersize=10 if family == "dense" else 6, capsize=2,
                    markerfacecolor="none" if threads == 1 else color)
        for r in mine:
            ax.annotate(r["row"], (r["tokens_per_s"], r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    dense = [r["ppl"] for r in rows if r["row"] == "dense"]
    if dense:
        ax.axhline(dense[0], color="black", linestyle=":", linewidth=1, alpha=0.6)
    ax.set_xlabel("greedy decode tokens/s (batch 1, median; bars: min-max)")
    ax.set_ylabel("perplexity (held-out Wikipedia)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.0f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.0f"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    warn = "; LOADED MACHINE: timings suspect" if result["loaded"] else ""
    ax.set_title(f"SmolLM2-135M vs peers, {a['new_tokens']} new tokens ({result.get('cpu_model')}; down and right "
                 f"is better{warn})", fontsize=9)
    fig.tight_layout()
    path = os.path.join(RESULTS, f"{name}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
