"""Perplexity of SmolLM2-135M bf16 with quantized FFN weights: the quantized packs' references and
tardis over int8 / int4 at a few budgets, with the int4 guard and the exact guard over the pack's own
quantized rows. Only the FFNs are quantized (attention and the head stay bf16).

Rows: dense; int8 FFNs with W_d scaled per output channel (what torchao's int8 weight-only does, and
since 2026-12-08 the int8 packs' reference, ``runtime/quantize.py``) and per neuron (the int8 packs'
reference before); the int8 / int4 references
(``tc.quantized_reference``); tardis over each encoding at each budget and guard. PPL on held-out
Wikipedia windows of 512 tokens. Writes ``benchmarks/results/<out>.json``.

    python benchmarks/quantized_quality.py                              # int4 and int8, 0.5 and 0.7
    python benchmarks/quantized_quality.py --weights int4 --budgets 0.7 --guards int4
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import tardis_compiler as tc
from common import machine, write_json


def int8_ffns(model: torch.nn.Module, down_per_output_channel: bool) -> torch.nn.Module:
    """A copy whose gate / up / down weights are symmetric int8 values: one scale per output channel,
    and for W_d per output channel or per neuron (its input channel)."""
    def q8(w: torch.Tensor, dim: int) -> torch.Tensor:
        scale = w.float().abs().amax(dim=dim, keepdim=True).clamp(min=1e-30) / 127
        return (torch.round(w.float() / scale).clamp(-127, 127) * scale).to(w.dtype)

    out = copy.deepcopy(model)
    with torch.no_grad():
        for layer in out.model.layers:
            mlp = layer.mlp
            mlp.gate_proj.weight.copy_(q8(mlp.gate_proj.weight, 1))
            mlp.up_proj.weight.copy_(q8(mlp.up_proj.weight, 1))
            mlp.down_proj.weight.copy_(q8(mlp.down_proj.weight, 1 if down_per_output_channel else 0))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", nargs="+", default=["int4", "int8"], choices=["int8", "int4"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.7])
    parser.add_argument("--guards", nargs="+", default=["exact", "int4"])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--out", default="quantized_quality")
    args = parser.parse_args()
    torch.set_num_threads(2)

    from tardis_compiler.eval.corpus import calibration_batches, evaluation_windows, special_tokens
    from tardis_compiler.eval.metrics import perplexity
    from tardis_compiler.eval.models import load_smollm2

    model, tok = load_smollm2()
    model = model.to(torch.bfloat16).eval()
    prefix = special_tokens(tok)[0]
    windows = evaluation_windows(tok, context_length=512, num_windows=args.windows)
    batches = calibration_batches(tok, context_length=512, num_batches=16)
    rows: list[dict] = []

    def note(row: str, m: torch.nn.Module, **extra) -> None:
        rows.append({"row": row, "ppl": perplexity(m, windows, prefix).value, **extra})
        print(f"{row}: PPL {rows[-1]['ppl']:.3f}", flush=True)

    note("dense bf16", model)
    note("int8 FFNs, W_d per output channel", int8_ffns(model, True))
    note("int8 FFNs, W_d per neuron", int8_ffns(model, False))
    example = batches[0][:, :16]
    for encoding in args.weights:
        note(f"{encoding} FFN reference", tc.quantized_reference(model, example, weights=encoding))
        config = tc.CalibrationConfig(progress=False, weights=encoding)
        recorder = tc.record(model, batches, config)
        for guard in args.guards:
            for budget in args.budgets:
                start = time.perf_counter()
                profile = tc.calibrate_for_budget(model, batches, budget, guard, config, recorder=recorder)
                compressed = copy.deepcopy(model)
                report = tc.compress_(compressed, profile, example, guard=guard)
                note(f"tardis over {encoding} {budget} guard {guard}", compressed, weights=encoding, budget=budget,
                     guard=guard, read_fraction_of_bf16=report.read_fraction(),
                     fit_seconds=time.perf_counter() - start)
    dense = rows[0]["ppl"]
    for r in rows:
        r["vs_dense"] = r["ppl"] / dense - 1
    print("wrote", write_json(f"{args.out}.json", {**machine(), "args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
