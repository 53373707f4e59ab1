"""End-to-end greedy decode on SmolLM2-135M, batch 1: tokens/s with perplexity beside it, so the
table reads as a speed / quality front. All variants in one process, interleaved, medians.

Rows: dense fp32 and bf16, eager and inductor; dense bf16 with int8 weight-only linears (the package's
QuantizedLinear: torch's packed int8 GEMV, per-channel scales: the quantization peer), eager and inductor; tardis fp32 and
bf16 at budgets 0.3 / 0.5 / 0.7 (inductor around the fused op); the activation-sparsity baseline
(the same mix with no folded matrix, c = 0: flagged neurons exact, the rest contribute nothing) at
the same budgets through the same kernel; and dense bf16 inductor with the FFNs removed, the ceiling
on what any FFN compression can give.

Prompts are held-out Wikipedia windows; each variant generates exactly ``--new-tokens``. PPL is on
``--ppl-windows`` held-out windows of 512 tokens. "bytes-bound ideal" is the faster dense time of the
same dtype with its FFN time scaled by the FFN bytes fraction (FFN time = dense - FFNs removed).

    python benchmarks/smollm2_decode.py          # writes results/smollm2_decode.json and .png
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import tardis_compiler as tc
from tardis_compiler.runtime.quantized_linear import QuantizedLinear
from common import ISAS, RESULTS, cached_profiles, compile_forward, machine, pin_isa, write_json


def int8_model(model):
    """A copy of ``model`` with every ``nn.Linear`` int8 weight-only: the package's ``QuantizedLinear``
    (torch's packed int8 GEMV, per-output-channel scales; what ``compress_(..., other_linears="int8")``
    installs), the LM head included (SmolLM2's is tied: the embedding keeps its dense weight)."""
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        if type(module) is torch.nn.Linear:
            out.set_submodule(name, QuantizedLinear.from_linear(module, 8))
    return out


class NoFFN(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def without_ffns(model):
    out = copy.deepcopy(model)
    for layer in out.model.layers:
        layer.mlp = NoFFN()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--sparsity-budgets", nargs="*", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ppl-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", choices=sorted(ISAS), help="run as on a CPU with only this instruction set "
                        "(torch's kernels and the tardis kernel; e.g. avx2: no AVX-512)")
    parser.add_argument("--out", default="smollm2_decode", help="name of the JSON/PNG written under results/")
    args = parser.parse_args()
    pin_isa(args.isa)
    torch.set_num_threads(args.threads)

    from tardis_compiler.eval.corpus import calibration_batches, evaluation_windows, special_tokens
    from tardis_compiler.eval.metrics import perplexity
    from tardis_compiler.eval.models import load_smollm2

    base, tok = load_smollm2()
    prefix = special_tokens(tok)[0]
    windows = evaluation_windows(tok, context_length=512, num_windows=max(args.prompts, args.ppl_windows))
    prompts = [torch.cat([torch.tensor(prefix, dtype=torch.long), w[:args.prompt_tokens]])[None]
               for w in windows[:args.prompts]]
    batches = calibration_batches(tok, context_length=512, num_batches=16)
    config = tc.CalibrationConfig(progress=False)

    variants: dict[str, tuple[torch.nn.Module, object, dict]] = {}  # name -> (model, forward, info)
    ppl_forwards: dict = {}  # variant -> the forward its perplexity is measured with
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        model = base if dtype == torch.float32 else copy.deepcopy(base).to(dtype)  # .to() is in place
        short = dtype_name.replace("float32", "fp32").replace("bfloat16", "bf16")
        info = {"dtype": short, "bytes_fraction": 1.0}
        variants[f"dense {short} eager"] = (model, model.forward, dict(info, kind="dense"))
        variants[f"dense {short} inductor"] = (model, compile_forward(model, backend="inductor"),
                                             dict(info, kind="dense"))
        if dtype == torch.bfloat16:
            q8 = int8_model(model).eval()
            variants["int8 weight-only bf16 eager"] = (q8, q8.forward, dict(info, kind="int8"))
            variants["int8 weight-only bf16 inductor"] = (q8, compile_forward(q8),
                                                           dict(info, kind="int8"))
            bare = without_ffns(model).eval()
            variants["dense bf16 inductor, FFNs removed"] = (bare, compile_forward(bare),
                                                              dict(info, kind="ceiling", bytes_fraction=0.0))
        profiles = cached_profiles(f"smollm2-{dtype_name}", model, batches, args.budgets, config)
        for budget, profile in profiles.items():
            variants[f"tardis {short} {budget}"] = (model, compile_forward(
                model, backend="tardis", options={"profile": profile}),
                dict(info, kind="tardis", budget=budget, bytes_fraction=profile.bytes_fraction()))
            # Perplexity through the pack on every token (the default runs 512-token windows dense).
            ppl_forwards[f"tardis {short} {budget}"] = compile_forward(
                model, backend="tardis", options={"profile": profile, "dense_above": None})
        if dtype == torch.bfloat16 and args.sparsity_budgets:
            sparse = cached_profiles(f"smollm2-{dtype_name}-nofold", model, batches, args.sparsity_budgets,
                                     tc.CalibrationConfig(progress=False, fold=False))
            for budget, profile in sparse.items():
                variants[f"activation sparsity (c = 0) {short} {budget}"] = (model, compile_forward(
                    model, backend="tardis", options={"profile": profile}),
                    dict(info, kind="sparsity", budget=budget, bytes_fraction=profile.bytes_fraction()))
                ppl_forwards[f"activation sparsity (c = 0) {short} {budget}"] = compile_forward(
                    model, backend="tardis", options={"profile": profile, "dense_above": None})

    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=tok.eos_token_id)

    def run(model, forward, prompt):
        original = model.forward
        model.forward = forward
        try:
            with torch.no_grad():
                start = time.perf_counter()
                out = model.generate(prompt, **generate)
                return time.perf_counter() - start, out[0, prompt.shape[1]:]
        finally:
            model.forward = original

    outputs, ppl = {}, {}
    for name, (model, forward, info) in variants.items():  # warm up (compiles), then perplexity
        start = time.perf_counter()
        with tc.collect_stats() as stats:
            outputs[name] = [run(model, forward, p)[1] for p in prompts]
        if info["kind"] in ("tardis", "sparsity") and not stats.ffns:
            raise RuntimeError(f"{name}: no tardis op ran (did dynamo fall back to eager?)")
        model.forward, original = ppl_forwards.get(name, forward), model.forward
        try:
            ppl[name] = perplexity(model, windows[:args.ppl_windows], prefix).value
        finally:
            model.forward = original
        print(f"{name}: warm-up and PPL {ppl[name]:.2f} in {time.perf_counter() - start:.0f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for prompt in prompts:
            for name, (model, forward, _) in variants.items():  # interleaved
                times[name].append(run(model, forward, prompt)[0])

    rows = []
    for name, (_, _, info) in variants.items():
        tps = args.new_tokens / statistics.median(times[name])
        same = statistics.mean(_prefix_agreement(a, b) for a, b in zip(outputs[name],
                                                                      outputs[f"dense {info['dtype']} eager"]))
        rows.append({"variant": name, **info, "tokens_per_s": tps, "ppl": ppl[name], "prefix_agreement": same})
    _add_ratios(rows)
    result = {**machine(), "args": vars(args), "rows": rows}
    path = write_json(f"{args.out}.json", result)
    print(markdown(result))
    _plot(rows, args.out)
    print(f"wrote {path}")


def _add_ratios(rows: list[dict]) -> None:
    """Per dtype: speed over the faster dense, and the bytes-bound ideal tokens/s (the FFN part of
    the faster dense time scaled by the bytes fraction; FFN time from the FFNs-removed row)."""
    by = {r["variant"]: r for r in rows}
    ceiling = by.get("dense bf16 inductor, FFNs removed")
    for r in rows:
        dense = [by[n] for n in (f"dense {r['dtype']} eager", f"dense {r['dtype']} inductor") if n in by]
        best = max(dense, key=lambda d: d["tokens_per_s"])
        r["vs_best_dense"] = r["tokens_per_s"] / best["tokens_per_s"]
        if ceiling is not None and r["dtype"] == "bf16" and r["kind"] in ("tardis", "sparsity"):
            t_dense, t_rest = 1 / best["tokens_per_s"], 1 / ceiling["tokens_per_s"]
            ideal_t = t_rest + (t_dense - t_rest) * r["bytes_fraction"]
            r["ideal_tokens_per_s"] = 1 / ideal_t
            r["of_ideal"] = r["tokens_per_s"] / r["ideal_tokens_per_s"]


def _prefix_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of generated tokens before the first disagreement."""
    return float((a == b).long().cumprod(0).sum()) / len(a)


def markdown(result: dict) -> str:
    lines = [f"SmolLM2-135M greedy decode, batch 1, {result['args']['new_tokens']} new tokens, "
             f"{result['threads']} threads ({result['kernel']}; torch ISA {result.get('torch_isa', 'native')}; "
             f"load average {result.get('load_average', ['?'])[0]})", "",
             "| variant | FFN bytes | tokens/s | vs faster dense (same dtype) | bytes-bound ideal tok/s | of ideal | "
             "PPL | same tokens as dense |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ideal = f"{r['ideal_tokens_per_s']:.1f}" if "ideal_tokens_per_s" in r else "-"
        of = f"{r['of_ideal']:.2f}" if "of_ideal" in r else "-"
        lines.append(f"| {r['variant']} | {r['bytes_fraction']:.3f} | {r['tokens_per_s']:.2f} | "
                     f"{r['vs_best_dense']:.2f}x | {ideal} | {of} | {r['ppl']:.2f} | {r['prefix_agreement']:.2f} |")
    return "\n".join(lines)


def _plot(rows: list[dict], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    marks = {"dense": "s", "int8": "D", "tardis": "o", "sparsity": "^"}
    for r in rows:
        if r["kind"] == "ceiling":
            continue
        color = "tab:blue" if r["dtype"] == "bf16" else "tab:gray"
        ax.scatter(r["tokens_per_s"], r["ppl"], marker=marks[r["kind"]], color=color)
        ax.annotate(r["variant"].replace("activation sparsity (c = 0)", "sparsity"), (r["tokens_per_s"], r["ppl"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("greedy decode tokens/s (batch 1, 2 threads)")
    ax.set_ylabel("perplexity (held-out Wikipedia)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M: speed / quality (down and right is better)")
    fig.tight_layout()
    fig.savefig(f"{RESULTS}/{name}.png", dpi=120)


if __name__ == "__main__":
    main()
