"""Where one decode step's time goes (issue 19, item 5): SmolLM2-135M, batch 1, eager, split by
module into FFN, attention projections, attention core (rotary, cache update, SDPA, reshapes), LM
head, norms, embedding, and the rest (generate's loop, sampling, the model's own glue). Variants:
dense bf16, int8 weight-only on every linear (torch's packed int8 GEMV), a tardis checkpoint
(``compress_`` at ``--budget``) in bf16, and tardis over int8 (quantized packs at ``--budget`` of the
int8 FFN's bytes, ``other_linears="int8"``).

Method: forward pre/post hooks time each categorised module with ``time.perf_counter`` (the CPU is
synchronous) during ``generate``; a module inside an already-timed one is not counted twice. The
hooks cost time themselves: the table shows the step time with and without them (interleaved,
medians), so the shares are of the hooked step. Eager only: under ``torch.compile`` module
boundaries are fused away; the eager / inductor gap is shown beside it.

    python benchmarks/token_profile.py                  # writes results/token_profile.json
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections import defaultdict

import torch

import tardis_compiler as tc
from common import ISAS, cached_profiles, machine, pin_isa, write_json
from smollm2_decode import compile_forward, int8_model

CATEGORIES = ("ffn", "attention projections", "attention core", "lm head", "norms", "embedding")


def category(name: str, module: torch.nn.Module) -> str | None:
    """The category of a module of a LLaMA-style model, by its path (None: not timed itself)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "mlp":
        return "ffn"
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return "attention projections"
    if leaf == "self_attn":
        return "attention core"  # minus its projections, which are timed apart
    if leaf == "lm_head":
        return "lm head"
    if "norm" in leaf:
        return "norms"
    if leaf == "embed_tokens":
        return "embedding"
    return None


class ModuleTimer:
    """Seconds spent in each category's modules while attached (nested projections are taken out
    of their attention module's time)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._stack: list[tuple[str, float, float]] = []  # (category, start, child seconds)
        self._handles = []
        for name, module in model.named_modules():
            cat = category(name, module)
            if cat is not None:
                self._handles.append(module.register_forward_pre_hook(self._pre(cat)))
                self._handles.append(module.register_forward_hook(self._post()))

    def _pre(self, cat: str):
        def hook(module, args):
            self._stack.append((cat, time.perf_counter(), 0.0))
        return hook

    def _post(self):
        def hook(module, args, output):
            cat, start, children = self._stack.pop()
            spent = time.perf_counter() - start
            self.seconds[cat] += spent - children
            if self._stack:  # the parent's time excludes this module's
                parent = self._stack[-1]
                self._stack[-1] = (parent[0], parent[1], parent[2] + spent)
        return hook

    def detach(self) -> None:
        for h in self._handles:
            h.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--isa", choices=sorted(ISAS))
    args = parser.parse_args()
    pin_isa(args.isa)
    torch.set_num_threads(args.threads)

    from tardis_compiler.eval.corpus import calibration_batches, evaluation_windows, special_tokens
    from tardis_compiler.eval.models import load_smollm2

    base, tok = load_smollm2()
    dense = copy.deepcopy(base).to(torch.bfloat16).eval()
    prefix = torch.tensor(special_tokens(tok)[0], dtype=torch.long)
    prompt = torch.cat([prefix, evaluation_windows(tok, context_length=512, num_windows=1)[0][:32]])[None]
    batches = calibration_batches(tok, context_length=512, num_batches=16)
    profile = cached_profiles("smollm2-bfloat16", dense, batches, [args.budget],
                              tc.CalibrationConfig(progress=False))[args.budget]
    compressed = copy.deepcopy(dense)
    tc.compress_(compressed, profile, batches[0][:, :16])
    # tardis over int8: quantized packs, calibrated against the int8 model, and int8 attention / head
    profile8 = cached_profiles("smollm2-bfloat16", dense, batches, [args.budget],
                               tc.CalibrationConfig(progress=False, weights="int8"))[args.budget]
    over_int8 = copy.deepcopy(dense)
    tc.compress_(over_int8, profile8, batches[0][:, :16], other_linears="int8")
    variants = {"dense bf16": dense, "int8 weight-only": int8_model(dense).eval(),
                f"tardis {args.budget} checkpoint (compress_)": compressed,
                f"tardis over int8 {args.budget} + int8 linears": over_int8}
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=tok.eos_token_id)

    def step_seconds(model, forward=None) -> float:
        original = model.forward
        model.forward = forward or original
        try:
            with torch.no_grad():
                start = time.perf_counter()
                model.generate(prompt, **generate)
                return (time.perf_counter() - start) / args.new_tokens
        finally:
            model.forward = original

    inductor = {name: compile_forward(model) for name, model in variants.items()}
    for name, model in variants.items():  # warm up (and compile)
        step_seconds(model)
        step_seconds(model, inductor[name])
    plain, hooked, compiled = defaultdict(list), defaultdict(list), defaultdict(list)
    shares: dict[str, dict[str, list[float]]] = {name: defaultdict(list) for name in variants}
    for _ in range(args.repeats):
        for name, model in variants.items():  # interleaved
            plain[name].append(step_seconds(model))
            compiled[name].append(step_seconds(model, inductor[name]))
            timer = ModuleTimer(model)
            try:
                total = step_seconds(model)
            finally:
                timer.detach()
            hooked[name].append(total)
            for cat in CATEGORIES:
                shares[name][cat].append(timer.seconds[cat] / args.new_tokens)
            shares[name]["rest (loop, sampling, glue, hooks)"].append(
                total - sum(timer.seconds.values()) / args.new_tokens)
    rows = []
    for name in variants:
        row = {"variant": name, "eager_ms": 1e3 * statistics.median(plain[name]),
               "inductor_ms": 1e3 * statistics.median(compiled[name]),
               "hooked_ms": 1e3 * statistics.median(hooked[name]),
               "parts_ms": {cat: 1e3 * statistics.median(v) for cat, v in shares[name].items()}}
        rows.append(row)
    result = {**machine(), "args": vars(args), "rows": rows}
    path = write_json("token_profile.json", result)
    print(markdown(result))
    print(f"wrote {path}")


def markdown(result: dict) -> str:
    parts = list(result["rows"][0]["parts_ms"])
    lines = [f"SmolLM2-135M bf16, one greedy decode step (ms), batch 1, {result['threads']} threads, "
             f"{result['kernel']}; load average {result['load_average'][0]:.2f}", "",
             "| variant | eager | inductor | eager, hooked | " + " | ".join(parts) + " |",
             "|---|" + "---|" * (3 + len(parts))]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['eager_ms']:.2f} | {r['inductor_ms']:.2f} | {r['hooked_ms']:.2f} | "
                     + " | ".join(f"{r['parts_ms'][p]:.2f}" for p in parts) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
