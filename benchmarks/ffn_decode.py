"""Per-call time of one FFN at batch 1 (decode), dense against tardis's fused op, fp32 and bf16.

Shapes: SmolLM2-135M's gated FFN (576 -> 1536, its 30 real layers, inputs recorded at each layer
from held-out Wikipedia text), MiniLM's plain FFN (384 -> 1536, its 6 real layers copied to 30) and
a synthetic plain 2048 -> 8192 GELU FFN (2 copies, x ~ N(0, 1), W ~ N(0, 1/d)). Every variant runs
each layer in turn over distinct weights, so weights come from DRAM, not cache, as in a model.

Rows: dense eager and dense inductor; dense int8 weight-only (torch's packed int8 GEMV with
per-channel scales, what torchao's int8 weight-only quantization runs; with ``--weights int4`` also
torch's CPU int4 GEMV, groups of 32); tardis at budgets 0.3 /
0.5 / 0.7 (SmolLM2, MiniLM) or the uniform coverage p = 0.85 (2048 x 8192); the fixed cost (the
guard and Wf with nothing flagged); and the op's bare overhead on a tiny FFN. Interleaved, medians.

"bytes-bound ideal" = the faster dense time x (tardis bytes / dense bytes), with tardis bytes
measured from the flags on the timed inputs.

    python benchmarks/ffn_decode.py                        # writes benchmarks/results/ffn_decode.json
    python benchmarks/ffn_decode.py --shapes smollm2 --dtypes bfloat16
    python benchmarks/ffn_decode.py --prefill              # tokens per call: guarded, every-bundle-exact, dense
    python benchmarks/ffn_decode.py --prefill --threads 1 --dtypes bfloat16 --tokens 1 2 4 8 32 64
    python benchmarks/ffn_decode.py --shapes llama-1b llama-8b --dtypes bfloat16  # larger shapes (llama_shapes.py)
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F

import tardis_compiler as tc
from common import ISAS, Bandwidth, cached_profiles, interleaved_medians, machine, pin_isa, write_json
from tardis_compiler.runtime import ffn_op
from tardis_compiler.runtime.cpu.kernel import kernel
from tardis_compiler.runtime.layout import KERNEL_ACTIVATIONS
from tardis_compiler.runtime.pack import build_pack, guard_all_params
from tardis_compiler.runtime.torch_path import ffn_exact, ffn_torch

ROWS = 16  # timed input rows per layer, cycled


@dataclasses.dataclass
class Setup:
    """One shape: per layer its dense module, neuron-major weights and timed input rows, and the
    profiles to fold it with (label -> (profile, FFN name per layer))."""

    name: str
    kind: str
    activation: str
    modules: list[torch.nn.Module]
    weights: list[dict]
    inputs: list[torch.Tensor]
    profiles: dict[str, tuple[tc.Profile, list[str]]]

    @property
    def dense_bytes(self) -> int:
        w = self.weights[0]
        return sum(t.numel() * t.element_size() for t in w.values() if t is not None)


class PlainFFN(torch.nn.Module):
    def __init__(self, w1, b1, w2, b2):
        super().__init__()
        self.up = torch.nn.Linear(w1.shape[1], w1.shape[0])
        self.down = torch.nn.Linear(w2.shape[1], w2.shape[0])
        with torch.no_grad():
            self.up.weight.copy_(w1), self.up.bias.copy_(b1), self.down.weight.copy_(w2), self.down.bias.copy_(b2)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def _record_inputs(model, modules, batches) -> list[torch.Tensor]:
    """Each module's input rows on ``batches`` (tokens, d)."""
    rows = [[] for _ in modules]
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: rows[i].append(inp[0].reshape(-1, inp[0].shape[-1])))
             for i, m in enumerate(modules)]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return [torch.cat(r) for r in rows]


def smollm2(dtype: torch.dtype, budgets, weights=(None,)) -> Setup:
    from tardis_compiler.eval.corpus import calibration_batches, evaluation_windows, special_tokens
    from tardis_compiler.eval.models import load_smollm2

    model, tok = load_smollm2()
    model = model.to(dtype)
    mlps = [layer.mlp for layer in model.model.layers]
    prefix = torch.tensor(special_tokens(tok)[0], dtype=torch.long)
    held_out = [torch.cat([prefix, w])[None] for w in evaluation_windows(tok, context_length=128, num_windows=1)]
    inputs = [x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:ROWS]]
              for x in _record_inputs(model, mlps, held_out)]
    batches = calibration_batches(tok, context_length=512, num_batches=16)
    names = [f"model.layers.{i}.mlp" for i in range(len(mlps))]
    by_label = {}
    for quant in weights:  # None: packs of the bf16 weights; "int8" / "int4": quantized packs (tardis over int8)
        profiles = cached_profiles(f"smollm2-{str(dtype)[6:]}", model, batches, budgets,
                                   tc.CalibrationConfig(progress=False, weights=quant))
        by_label.update({f"tardis{f' over {quant}' if quant else ''} {b}": (p, names) for b, p in profiles.items()})
    weights = [{"wg_rows": m.gate_proj.weight, "bg": None, "wu_rows": m.up_proj.weight, "bu": None,
                "wd_rows": m.down_proj.weight.t(), "bd": None} for m in mlps]
    return Setup("SmolLM2-135M (576 -> 1536 gated, 30 layers)", "gated", "silu", mlps, weights, inputs,
                 by_label)


def minilm(dtype: torch.dtype, budgets, copies: int = 5) -> Setup:
    from tardis_compiler.eval.corpus import calibration_batches
    from tardis_compiler.eval.models import load_minilm

    model, tok = load_minilm()
    model = model.to(dtype)
    layers = model.encoder.layer
    batches = calibration_batches(tok, context_length=128, num_batches=32)
    profiles = cached_profiles(f"minilm-{str(dtype)[6:]}", model, batches, budgets, tc.CalibrationConfig(progress=False))
    held_out = calibration_batches(tok, context_length=128, num_batches=1, seed=7)
    rows = _record_inputs(model, [layer.intermediate.dense for layer in layers], held_out)
    modules, weights, inputs, names = [], [], [], []
    for _ in range(copies):  # distinct copies: 30 layers' weights, so they come from DRAM
        for i, layer in enumerate(layers):
            w1, b1 = layer.intermediate.dense.weight.detach().clone(), layer.intermediate.dense.bias.detach().clone()
            w2, b2 = layer.output.dense.weight.detach().clone(), layer.output.dense.bias.detach().clone()
            modules.append(PlainFFN(w1, b1, w2, b2).to(dtype).eval())
            weights.append({"w1_rows": w1, "b1": b1, "w2_rows": w2.t(), "b2": b2})
            inputs.append(rows[i][:ROWS])
            names.append(f"encoder.layer.{i}")
    return Setup("MiniLM-L6 (384 -> 1536 GELU, 6 layers x 5 copies)", "plain", "gelu", modules, weights, inputs,
                 {f"tardis {b}": (p, names) for b, p in profiles.items()})


def synthetic(d: int, m: int, dtype: torch.dtype, coverage: float = 0.85, copies: int = 2) -> Setup:
    g = torch.Generator().manual_seed(0)
    modules, weights = [], []
    for _ in range(copies):
        w1, w2 = torch.randn(m, d, generator=g) / d ** 0.5, torch.randn(d, m, generator=g) / m ** 0.5
        b1, b2 = torch.randn(m, generator=g) * 0.5, torch.zeros(d)
        mod = PlainFFN(w1, b1, w2, b2).to(dtype).eval()
        modules.append(mod)
        weights.append({"w1_rows": mod.up.weight, "b1": mod.up.bias, "w2_rows": mod.down.weight.t(),
                        "b2": mod.down.bias})
    calib = torch.randn(4096, d, generator=g).to(dtype)
    profile = tc.calibrate(modules[0], [calib[i:i + 256] for i in range(0, 4096, 256)],
                           tc.CalibrationConfig(coverage=coverage, progress=False))
    inputs = [torch.randn(ROWS, d, generator=g).to(dtype) for _ in modules]
    return Setup(f"synthetic {d} -> {m} GELU (x {copies} copies)", "plain", "gelu", modules, weights, inputs,
                 {f"tardis p={coverage}": (profile, [""] * copies)})


def _linear_weights(setup: Setup, w: dict) -> list[torch.Tensor]:
    """One layer's (out, in) linear weights in its kind's order, the output linear last."""
    names = ("wg_rows", "wu_rows") if setup.kind == "gated" else ("w1_rows",)
    return [w[n] for n in names] + [(w["wd_rows"] if setup.kind == "gated" else w["w2_rows"]).t()]


def int8_weight_only(setup: Setup) -> list:
    """Per layer, per linear: (int8 codes, per-channel scales, bias) for torch._weight_int8pack_mm."""
    out = []
    for w in setup.weights:
        q = []
        for lin in _linear_weights(setup, w):
            scale = lin.float().abs().amax(1).clamp(min=1e-12) / 127
            q.append(((lin.float() / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous(),
                      scale.to(lin.dtype)))
        out.append(q)
    return out


def int4_weight_only(setup: Setup) -> list:
    """Per layer, per linear: a ``QuantizedLinear`` of 4 bits (groups of 32, torch's CPU int4 GEMV
    ``_weight_int4pack_mm_for_cpu``: what ``compress_(other_linears="int4")`` and torchao's CPU int4
    weight-only run)."""
    from tardis_compiler.runtime.quantized_linear import QuantizedLinear

    out = []
    for w in setup.weights:
        q = []
        for lin in _linear_weights(setup, w):
            module = torch.nn.Linear(lin.shape[1], lin.shape[0], bias=False, device="meta")
            module.weight = torch.nn.Parameter(lin.detach().contiguous(), requires_grad=False)
            q.append(QuantizedLinear.from_linear(module, 4))
        out.append(q)
    return out


def _int4_call(setup: Setup, q, i: int, x: torch.Tensor) -> torch.Tensor:
    w = setup.weights[i]
    if setup.kind == "gated":
        g, u, d = q[i]
        return d(F.silu(g(x)) * u(x))
    l1, l2 = q[i]
    return l2(F.gelu(l1(x) + w["b1"])) + w["b2"]


def _int8_call(setup: Setup, q, i: int, x: torch.Tensor) -> torch.Tensor:
    w = setup.weights[i]
    if setup.kind == "gated":
        (qg, sg), (qu, su), (qd, sd) = q[i]
        h = F.silu(torch._weight_int8pack_mm(x, qg, sg)) * torch._weight_int8pack_mm(x, qu, su)
        return torch._weight_int8pack_mm(h, qd, sd)
    (q1, s1), (q2, s2) = q[i]
    h = F.gelu(torch._weight_int8pack_mm(x, q1, s1) + w["b1"])
    return torch._weight_int8pack_mm(h, q2, s2) + w["b2"]


def _never_flag(params: torch.Tensor, m: int) -> torch.Tensor:
    """The same fold with every bundled neuron guarded by a band nothing leaves: guard + Wf only."""
    p = params.clone()
    keep = torch.isfinite(p[4, :m]) | torch.isfinite(p[5, :m]) | (p[4, :m] > p[5, :m]) | (p[2, :m] > p[3, :m])
    p[2, :m][keep], p[3, :m][keep], p[4, :m][keep], p[5, :m][keep] = -1e30, 1e30, -1e30, 1e30
    return p


def _tiny_pack(kind: str, activation: str, dtype: torch.dtype, guard: str):
    """A 16 -> 64 FFN that flags nothing: its call time is the op's fixed overhead."""
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    w = ({"wg_rows": r(64, 16), "bg": None, "wu_rows": r(64, 16), "bu": None, "wd_rows": r(64, 16), "bd": None}
         if kind == "gated" else {"w1_rows": r(64, 16), "b1": r(64), "w2_rows": r(64, 16), "b2": r(16)})
    return build_pack(kind, w, _never_flag(guard_all_params(64), 64), guard, activation, 64)


def bench(setup: Setup, repeats: int) -> dict:
    layers = len(setup.modules)
    guard = tc.config.DEFAULT_GUARDS[setup.kind]
    group = tc.CalibrationConfig().group_size
    # Each pack holds its guarded rows as calibration priced them (FFNProfile.bundles: int8 by default).
    packs = {label: [build_pack(setup.kind, setup.weights[i], prof.ffns[names[i]].params(guard), guard,
                                setup.activation, group, bundles=prof.ffns[names[i]].bundles,
                                weights_encoding=prof.ffns[names[i]].weights) for i in range(layers)]
             for label, (prof, names) in setup.profiles.items()}
    first_label, (first_prof, first_names) = next(iter(setup.profiles.items()))
    # The first profile's fold and guard, as its packs hold them (a quantized profile: quantized Wf and guard).
    fixed = [build_pack(setup.kind, setup.weights[i], _never_flag(first_prof.ffns[first_names[i]].params(guard),
                                                                   first_prof.ffns[first_names[i]].d_hidden),
                        guard, setup.activation, group, bundles=first_prof.ffns[first_names[i]].bundles,
                        weights_encoding=first_prof.ffns[first_names[i]].weights) for i in range(layers)]
    tiny = _tiny_pack(setup.kind, setup.activation, setup.inputs[0].dtype, guard)
    tiny_x = setup.inputs[0][:1, :16].contiguous()
    inductor = [torch.compile(m) for m in setup.modules]
    q8 = int8_weight_only(setup)

    def over_layers(call):
        def run():
            for r in range(ROWS):
                for i in range(layers):
                    call(i, setup.inputs[i][r:r + 1])
        return run

    variants = {"dense eager": over_layers(lambda i, x: setup.modules[i](x)),
                "dense inductor": over_layers(lambda i, x: inductor[i](x)),
                "dense int8 weight-only": over_layers(lambda i, x: _int8_call(setup, q8, i, x))}
    q4 = int4_weight_only(setup) if any("over int4" in label for label in packs) else None
    if q4 is not None:
        variants["dense int4 weight-only"] = over_layers(lambda i, x: _int4_call(setup, q4, i, x))
    for label, ps in packs.items():
        variants[label] = over_layers(lambda i, x, ps=ps: ffn_op.ffn(x, ps[i]))
    variants[f"fixed cost ({first_label}: guard + Wf, nothing flagged)"] = over_layers(
        lambda i, x: ffn_op.ffn(x, fixed[i]))
    variants["op overhead (16 -> 64 FFN)"] = over_layers(lambda i, x: ffn_op.ffn(tiny_x, tiny))
    with torch.no_grad():
        seconds = interleaved_medians(variants, repeats)
        measured = {label: _measured_bytes(setup, ps) for label, ps in packs.items()}
    calls = ROWS * layers
    us = {k: v / calls * 1e6 for k, v in seconds.items()}
    best = min(us["dense eager"], us["dense inductor"])
    bw = Bandwidth.load().read_gbps
    rows = []
    for name, t in us.items():
        row = {"variant": name, "us_per_call": t, "speedup_vs_best_dense": best / t}
        bytes_read = None
        if name in measured:  # first: "tardis over int8" rows name int8 too
            bytes_read, row["flag_rate"] = measured[name]
        elif name.startswith("fixed"):
            bytes_read = fixed[0].layout.bytes_per_token(0)
        elif name == "dense int4 weight-only":
            bytes_read = sum(q.resident_bytes() for q in q4[0])
        elif name.startswith("dense") and "int8" not in name:
            bytes_read = setup.dense_bytes
        elif "int8" in name:
            bytes_read = sum(q.numel() + s.numel() * s.element_size() for q, s in q8[0])
        if bytes_read is not None:
            row["bytes_per_call"] = bytes_read
            row["ideal_us"] = best * bytes_read / setup.dense_bytes
            row["of_ideal"] = row["ideal_us"] / t
            row["GBps"] = bytes_read / (t * 1e-6) / 1e9
            if bw:
                row["bandwidth_bound_us"] = bytes_read / (bw * 1e9) * 1e6
        rows.append(row)
    return {"shape": setup.name, "dtype": str(setup.weights[0]["w1_rows" if setup.kind == "plain" else "wg_rows"].dtype),
            "layers": layers, "dense_bytes": setup.dense_bytes, "rows": rows}


def _measured_bytes(setup: Setup, packs) -> tuple[float, float]:
    """Mean bytes one call reads on the timed inputs (from the kernel's flag counters), and the
    flag rate over all neurons."""
    with tc.collect_stats() as stats:
        for r in range(ROWS):
            for i, pack in enumerate(packs):
                ffn_op.ffn(setup.inputs[i][r:r + 1], pack, name=str(i))
    total = flags = 0.0
    for i, pack in enumerate(packs):
        c = stats.ffns[str(i)]
        total += pack.layout.bytes_per_token(c.corrected / c.calls)
        flags += c.flag_rate
    return total / len(packs), flags / len(packs)


PREFILL_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 512)


def prefill(repeats: int, dtypes=(torch.bfloat16, torch.float32), token_counts=PREFILL_TOKENS) -> dict:
    """Time per call by tokens (SmolLM2, 0.5): the guarded paths (fused kernel, torch path), the paths
    of calls above ``dense_above`` without dense weights (every bundle exact: torch's GEMMs over
    model-dtype rows, the kernel's exact_all mode over int8 rows), and the dense FFN."""
    out = {}
    for dtype in dtypes:
        setup = smollm2(dtype, [0.5])
        prof, names = setup.profiles["tardis 0.5"]
        packs = {rows: [build_pack("gated", setup.weights[i], prof.ffns[names[i]].params("int4"), "int4", "silu", 64,
                                   bundles=rows) for i in range(len(names))] for rows in ("dense", "int8")}
        rows = []
        for tokens in token_counts:
            xs = [x[:1].expand(tokens, -1).contiguous() + 0.01 * torch.randn(tokens, x.shape[1]).to(dtype)
                  for x in setup.inputs]
            ys = [torch.empty(tokens, 576, dtype=dtype) for _ in xs]
            k = kernel()
            chunks = [(s_, min(s_ + 64, tokens)) for s_ in range(0, tokens, 64)]  # the kernel takes <= 64

            def fused(rows: str, exact_all: bool = False):
                def run():
                    for i, pack in enumerate(packs[rows]):
                        for a, b in chunks:
                            k.ffn(xs[i][a:b], ys[i][a:b], *pack.tensors(), KERNEL_ACTIVATIONS["silu"],
                                  exact_all=exact_all)
                return run

            dense_rows = packs["dense"]
            variants = {
                "fused kernel": fused("dense"),
                "torch path": lambda: [ffn_torch(xs[i], *p.tensors(), p.layout) for i, p in enumerate(dense_rows)],
                "exact, bf16 rows (torch)": lambda: [ffn_exact(xs[i], *p.tensors()[:3], p.layout)
                                                     for i, p in enumerate(dense_rows)],
                "fused kernel, int8 rows": fused("int8"),
                "exact, int8 rows (kernel)": fused("int8", exact_all=True),
                "dense eager": lambda: [setup.modules[i](xs[i]) for i in range(len(dense_rows))],
            }
            with torch.no_grad():
                s = interleaved_medians(variants, repeats)
            rows.append({"tokens": tokens, **{k_: v / len(dense_rows) * 1e6 for k_, v in s.items()}})
            print(rows[-1], flush=True)
        out[str(dtype)] = rows
    return out


def markdown(results: dict) -> str:
    lines = []
    for s in results.get("shapes", []):
        lines.append(f"\n**{s['shape']}**, {s['dtype'][6:]}, batch 1, {results['threads']} threads\n")
        lines.append("| variant | us/call | vs faster dense | flag rate | MB read/call | bytes-bound ideal us | "
                     "of ideal | at read limit us | GB/s |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in s["rows"]:
            f = lambda k, spec: format(r[k], spec) if k in r else "-"  # noqa: E731
            lines.append(f"| {r['variant']} | {r['us_per_call']:.0f} | {r['speedup_vs_best_dense']:.2f}x | "
                         f"{f('flag_rate', '.3f')} | {r['bytes_per_call'] / 1e6:.3f} | {f('ideal_us', '.0f')} | "
                         f"{f('of_ideal', '.2f')} | {f('bandwidth_bound_us', '.0f')} | {f('GBps', '.1f')} |"
                         if "bytes_per_call" in r else
                         f"| {r['variant']} | {r['us_per_call']:.1f} | {r['speedup_vs_best_dense']:.2f}x | - | - | - | - | - | - |")
    for dtype, rows in results.get("prefill", {}).items():
        lines.append(f"\n**Tokens per call, SmolLM2 FFN, budget 0.5, {dtype[6:]}, {results.get('threads')} threads** "
                     "(us per call)\n")
        names = [k for k in rows[0] if k != "tokens"]
        lines.append("| tokens | " + " | ".join(names) + " |")
        lines.append("|---" * (len(names) + 1) + "|")
        for r in rows:
            lines.append(f"| {r['tokens']} | " + " | ".join(f"{r[k]:.0f}" for k in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["smollm2", "minilm", "2048x8192"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--weights", nargs="+", choices=["dense", "int8", "int4"], default=["dense"],
                        help="SmolLM2 tardis rows: packs of the model's weights and/or quantized packs (tardis over "
                        "int8 / int4; int4 adds torch's int4 weight-only row)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill", action="store_true", help="time tokens per call instead")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(PREFILL_TOKENS), help="with --prefill: "
                        "the token counts per call")
    parser.add_argument("--isa", choices=sorted(ISAS), help="run as on a CPU with only this instruction set")
    parser.add_argument("--kernel-march", help="with --isa: build the tardis kernel for this -march instead "
                        "(x86-64-v2: its portable loops)")
    parser.add_argument("--out", help="name of the JSON written under results/ (default: ffn_decode / ffn_prefill)")
    args = parser.parse_args()
    pin_isa(args.isa, args.kernel_march)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = machine()
    results["threads"] = args.threads
    if args.prefill:
        results["prefill"] = prefill(args.repeats, [getattr(torch, d) for d in args.dtypes], args.tokens)
        path = write_json(f"{args.out or 'ffn_prefill'}.json", results)
    else:
        results["shapes"] = []
        for shape in args.shapes:
            for dtype in (getattr(torch, d) for d in args.dtypes):
                if shape == "smollm2":
                    setup = smollm2(dtype, args.budgets, [None if w == "dense" else w for w in args.weights])
                elif shape == "minilm":
                    setup = minilm(dtype, args.budgets)
                elif shape.startswith("llama-"):
                    from llama_shapes import llama  # imports this module: loaded only when asked for

                    setup = llama(shape, dtype, args.budgets, [None if w == "dense" else w for w in args.weights])
                else:
                    d, m = map(int, shape.split("x"))
                    setup = synthetic(d, m, dtype)
                results["shapes"].append(bench(setup, args.repeats))
                print(markdown({"shapes": results["shapes"][-1:], "threads": args.threads}), flush=True)
                torch.compiler.reset()
        path = write_json(f"{args.out or 'ffn_decode'}.json", results)
    print(markdown(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
