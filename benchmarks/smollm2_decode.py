"""End-to-end greedy decode tokens/s on SmolLM2-135M: dense eager, dense inductor and tardis (at a
bytes budget, inductor inside), in one process, interleaved, median of repeats.

Prompts are the starts of held-out Wikipedia windows; every variant generates exactly
``--new-tokens`` tokens at batch 1 (``min_new_tokens`` = ``max_new_tokens``). Also reports how many
generated tokens tardis shares with dense greedy decoding (prefix agreement), since a compressed
model's tokens/s means little without it.

    python benchmarks/smollm2_decode.py                   # budget 0.5, default guard (int4)
    python benchmarks/smollm2_decode.py --budget 0.7 --profile /tmp/smol-0.7   # reuse a profile
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

import tardis_compiler as tc

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--guard", default=None, help="default: the backend's (int4 for gated FFNs)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--profile", default=None, help="load this profile folder if it exists, else save to it")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from tardis_compiler.eval.corpus import calibration_batches, evaluation_windows, special_tokens
    from tardis_compiler.eval.models import load_smollm2

    model, tokenizer = load_smollm2()
    prefix = torch.tensor(special_tokens(tokenizer)[0], dtype=torch.long)
    windows = evaluation_windows(tokenizer, context_length=512, num_windows=args.prompts)
    prompts = [torch.cat([prefix, w[:args.prompt_tokens]])[None] for w in windows]
    profile = _profile(model, tokenizer, args, calibration_batches)

    eager = model.forward
    variants = {
        "dense eager": eager,
        "dense inductor": torch.compile(eager, backend="inductor", dynamic=True),
        f"tardis {args.budget} ({args.guard or 'int4'})": torch.compile(
            eager, backend="tardis", dynamic=True, options={"profile": profile, "guard": args.guard}),
    }
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                    pad_token_id=tokenizer.eos_token_id)

    def run(forward, prompt):
        model.forward = forward
        try:
            with torch.no_grad():
                start = time.perf_counter()
                out = model.generate(prompt, **generate)
                return time.perf_counter() - start, out[0, prompt.shape[1]:]
        finally:
            model.forward = eager

    outputs = {}
    for name, forward in variants.items():  # warm up: compile every shape the decode loop sees
        outputs[name] = [run(forward, p)[1] for p in prompts]
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for prompt in prompts:
            for name, forward in variants.items():  # interleaved: machine noise hits all alike
                times[name].append(run(forward, prompt)[0])

    dense_tokens = outputs["dense eager"]
    rows = []
    for name in variants:
        seconds = statistics.median(times[name])
        agree = [_prefix_agreement(a, b) for a, b in zip(outputs[name], dense_tokens)]
        rows.append({"variant": name, "tokens_per_s": args.new_tokens / seconds, "median_s": seconds,
                     "prefix_agreement_with_dense": statistics.mean(agree)})
    base = rows[0]["tokens_per_s"]
    print(f"SmolLM2-135M greedy decode, batch 1, {args.new_tokens} new tokens, {args.prompts} prompts x "
          f"{args.repeats} repeats, {torch.get_num_threads()} threads")
    print(f"{'variant':28} {'tok/s':>7} {'vs eager':>9} {'vs inductor':>12} {'same tokens as dense':>21}")
    for row in rows:
        print(f"{row['variant']:28} {row['tokens_per_s']:7.2f} {row['tokens_per_s'] / base:8.2f}x "
              f"{row['tokens_per_s'] / rows[1]['tokens_per_s']:11.2f}x {row['prefix_agreement_with_dense']:21.2f}")
    print(f"FFN bytes read per token (calibration estimate): {profile.bytes_fraction(args.guard):.3f} of dense")
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "smollm2_decode.json")
    with open(path, "w") as f:
        json.dump({"args": vars(args), "rows": rows, "bytes_fraction": profile.bytes_fraction(args.guard),
                   "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, "
                              f"{os.cpu_count()} CPUs", "torch": torch.__version__,
                   "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}, f, indent=1)
    print(f"wrote {path}")


def _profile(model, tokenizer, args, calibration_batches) -> tc.Profile:
    if args.profile and os.path.isdir(args.profile):
        return tc.Profile.load(args.profile)
    batches = calibration_batches(tokenizer, context_length=512, num_batches=args.calibration_batches)
    profile = tc.calibrate_for_budget(model, batches, args.budget, args.guard)
    if args.profile:
        profile.save(args.profile)
    return profile


def _prefix_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of generated tokens before the first disagreement."""
    same = (a == b).long()
    return float(same.cumprod(0).sum()) / len(a)


if __name__ == "__main__":
    main()
