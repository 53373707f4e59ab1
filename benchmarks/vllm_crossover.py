"""Inside vLLM, at which decode batch does the dense FFN beat the pack? (issue 20, item 5)

Run it in the vLLM venv (``.ci/install-vllm``)::

    .venv-vllm/bin/python benchmarks/vllm_crossover.py                   # results/vllm_crossover.json
    .venv-vllm/bin/python benchmarks/vllm_crossover.py --budget 0.3 --dtype float32

One vLLM engine (eager, so forward hooks fire) serves the ``--keep-dense`` checkpoint of SmolLM2 at
``--budget`` (benchmarks/vllm_serve.py builds and caches it). Its 30 ``TardisMLP`` modules hold the
pack and the FFN's own linears. A hook records each MLP's input at a real decode step of 64 running
requests (held-out Wikipedia prompts, greedy); then, in vLLM's worker (its thread binding: one
compute thread on 2 cores by default), every layer's MLP runs on the first ``b`` of those rows, for
b in 1, 4, 8, 16, 32, 64, once through the pack (``torch.ops.tardis.ffn``) and once through the dense
linears, the two taking turns; medians over ``--repeats`` of the sum over the 30 layers. The
crossover is the largest batch at which the pack is still faster: vLLM's ``dense_above``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BATCHES = (1, 4, 8, 16, 32, 64)


def _record_inputs(model) -> None:
    from tardis_compiler.vllm.mlp import TardisMLP

    model._tardis_inputs = inputs = {}

    def hook(module, args, name):
        if args[0].shape[0] == max(BATCHES):  # a decode step of every running request
            inputs[name] = args[0].detach().clone()

    for name, module in model.named_modules():
        if isinstance(module, TardisMLP):
            module.register_forward_hook(lambda mod, args, out, name=name: hook(mod, args, name))


def _time_paths(model, repeats: int) -> dict:
    import torch

    inputs = model._tardis_inputs
    modules = [model.get_submodule(name) for name in inputs]
    xs = list(inputs.values())
    out = {"threads": torch.get_num_threads(), "layers": len(modules), "rows": []}

    def run(batch: int, dense_above: int) -> float:
        for module in modules:
            module.dense_above = dense_above
        start = time.perf_counter()
        with torch.no_grad():
            for module, x in zip(modules, xs):
                module(x[:batch])
        return time.perf_counter() - start

    saved = [m.dense_above for m in modules]
    try:
        for batch in BATCHES:
            samples = {"pack": [], "dense": []}
            run(batch, 1 << 30), run(batch, 0)  # warm-up
            for _ in range(repeats):
                samples["pack"].append(run(batch, 1 << 30))  # never dense: the pack (fused kernel up to 64)
                samples["dense"].append(run(batch, 0))  # always dense: the FFN's own linears
            out["rows"].append({"batch": batch, **{f"{k}_us": statistics.median(v) * 1e6 for k, v in samples.items()}})
    finally:
        for module, above in zip(modules, saved):
            module.dense_above = above
    return out


def worker(folder: Path, dtype: str, repeats: int) -> dict:
    """In one vLLM engine: record decode-step MLP inputs, then time pack against dense per batch."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm_serve import prompts

    llm = LLM(model=str(folder), dtype=dtype, enforce_eager=True, max_model_len=256, seed=0,
              max_num_seqs=max(BATCHES))
    import functools

    import vllm_crossover  # the functions vLLM's engine process unpickles by module name, not __main__'s copies

    llm.apply_model(vllm_crossover._record_inputs)
    ids = prompts(folder, max(BATCHES))
    llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], SamplingParams(max_tokens=3, temperature=0,
                 ignore_eos=True), use_tqdm=False)
    return llm.apply_model(functools.partial(vllm_crossover._time_paths, repeats=repeats))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--in-process", action="store_true",
                        help="the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0: both cores compute) "
                             "instead of vLLM's default engine process (one bound compute thread on 2 cores)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if args.in_process else "1"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model sends functions to the engine process
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(HERE))
    from common import OutsideLoad, machine, write_json
    from vllm_serve import build

    folder = build(f"tardis-{args.budget}-keep", args.dtype)
    with OutsideLoad() as load:
        result = worker(folder, args.dtype, args.repeats)
    faster = [r["batch"] for r in result["rows"] if r["pack_us"] < r["dense_us"]]
    crossover = max((b for b in faster if all(b2 in faster for b2 in BATCHES if b2 <= b)), default=0)
    lines = [(f"SmolLM2 {args.dtype}, budget {args.budget}, inside vLLM ({result['threads']} compute thread(s)), "
              f"sum over {result['layers']} MLPs, median of {args.repeats}"),
             "| decode batch | pack us | dense us | pack / dense |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['pack_us']:.0f} | {r['dense_us']:.0f} | {r['pack_us'] / r['dense_us']:.2f} |")
    lines.append(f"crossover: the pack is faster up to {crossover} tokens per call (dense_above = {crossover})")
    print("\n".join(lines))
    mode = "in-process" if args.in_process else "engine-process"
    path = write_json(f"vllm_crossover-{args.dtype}-{args.budget}-{mode}.json",
                      {"machine": machine(), "args": vars(args), "outside_load": load.record(), **result,
                       "crossover": crossover, "table": lines})
    print(f"wrote {path}")


if __name__ == "__main__":  # vLLM starts its engine process with spawn
    main()
