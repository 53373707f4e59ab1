"""``run_eval``: load a model and its data once, then prepare and measure every method at every
budget, side by side in one process, on the same calibration tokens and the same evaluation text.
"""
from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from .errors import MethodNotApplicable
from .accounting import FFNBytes, PreparedModel
from .config import EvalConfig
from .corpus import (calibration_batches, evaluation_passages, evaluation_windows, special_tokens,
                     wikipedia_split)
from .methods import get_method, method_names
from .metrics import (embedding_cosine, evaluate_task, mean_accuracy, mean_accuracy_stderr, perplexity,
                      sentence_embeddings)
from .models import LoadedModel, check_context, is_compressed, load_model
from .tasks import Task, load_task


@dataclasses.dataclass
class EvalData:
    """Everything a run measures on, built once: calibration batches and evaluation inputs."""

    calibration: list[torch.Tensor]
    prefix: list[int]
    windows: list[torch.Tensor] = dataclasses.field(default_factory=list)
    tasks: list[Task] = dataclasses.field(default_factory=list)
    passages: list[str] = dataclasses.field(default_factory=list)
    reference_embeddings: torch.Tensor | None = None
    task_limit: int | None = None  # how ``tasks`` were subset, for a scorer that reloads them
    seed: int = 0

    def summary(self) -> dict[str, Any]:
        """Sizes, for the results record."""
        return {"calibration_batches": len(self.calibration),
                "calibration_tokens": sum(int(b.numel()) for b in self.calibration),
                "ppl_windows": len(self.windows),
                "ppl_tokens": sum(int(w.numel()) for w in self.windows),
                "bos_prefix": self.prefix,
                "tasks": {t.name: len(t.items) for t in self.tasks},
                "passages": len(self.passages)}


def prepare_data(loaded: LoadedModel, config: EvalConfig, context_length: int) -> EvalData:
    """Calibration batches and evaluation inputs for ``loaded``'s kind of model.

    Example:
        >>> loaded = load_model("minilm")
        >>> data = prepare_data(loaded, EvalConfig.from_preset("quick", model="minilm", passages=8), 128)
        >>> len(data.calibration), len(data.passages)
        (8, 8)
    """
    split = wikipedia_split(config.seed)
    tokenizer = loaded.tokenizer
    data = EvalData(
        calibration=calibration_batches(tokenizer, context_length=context_length,
                                        num_batches=config.calibration_batches, seed=config.seed,
                                        split=split),
        prefix=special_tokens(tokenizer)[0], task_limit=config.task_limit, seed=config.seed)
    if loaded.spec.kind == "causal-lm":
        data.windows = evaluation_windows(tokenizer, context_length=context_length,
                                          num_windows=config.ppl_windows, seed=config.seed,
                                          split=split)
        data.tasks = [load_task(name, limit=config.task_limit, seed=config.seed)
                      for name in config.tasks]
    else:
        data.passages = evaluation_passages(count=config.passages, seed=config.seed, split=split)
        data.reference_embeddings = sentence_embeddings(
            loaded.model, tokenizer, data.passages, max_length=context_length,
            progress=config.progress)
    return data


def measure(prepared: PreparedModel, loaded: LoadedModel, data: EvalData, context_length: int,
            *, progress: bool = False, scorer: str = "lm-eval") -> tuple[dict[str, Any], FFNBytes, str]:
    """Metrics of one prepared model, and its bytes (measured on the evaluation text when the
    method has a meter, else as the method computed them). Zero-shot tasks are scored by
    ``scorer``: "lm-eval" (``lmeval.evaluate_tasks``) or "fast" (``metrics.evaluate_task``).

    Example:
        >>> from tardis_compiler.eval.methods import dense
        >>> loaded = load_model("minilm")
        >>> data = prepare_data(loaded, EvalConfig.from_preset("quick", model="minilm", passages=8), 128)
        >>> metrics, ffn_bytes, source = measure(dense(loaded.model, [], 1.0), loaded, data, 128)
        >>> round(metrics["cosine_mean"], 4), ffn_bytes.read_fraction
        (1.0, 1.0)
    """
    model, metrics = prepared.model, {}
    if prepared.meter is not None:
        prepared.meter.reset()
    with torch.no_grad():
        if loaded.spec.kind == "causal-lm":
            result = perplexity(model, data.windows, data.prefix, progress=progress)
            metrics["ppl"] = result.value
            metrics["ppl_tokens"] = result.tokens
        else:
            embeddings = sentence_embeddings(model, loaded.tokenizer, data.passages,
                                             max_length=context_length, progress=progress)
            metrics.update(embedding_cosine(data.reference_embeddings, embeddings))
    ffn_bytes, source = prepared.ffn_bytes, "static"
    if prepared.meter is not None:
        # The meter saw only the evaluation text so far (zero-shot batches carry padding).
        ffn_bytes = dataclasses.replace(ffn_bytes, read_per_token=prepared.meter.read_per_token())
        source = "measured on evaluation text"
    with torch.no_grad():
        if scorer == "lm-eval" and data.tasks:
            from .lmeval import evaluate_tasks

            metrics.update(evaluate_tasks(model, loaded.tokenizer, [t.name for t in data.tasks],
                                          limit=data.task_limit, seed=data.seed,
                                          max_length=context_length))
        else:
            for task in data.tasks:
                metrics[task.name] = evaluate_task(model, loaded.tokenizer, task, prefix=data.prefix,
                                                   max_length=context_length, progress=progress)
    if data.tasks:
        metrics["mean_accuracy"] = mean_accuracy(metrics)
        metrics["mean_accuracy_stderr"] = mean_accuracy_stderr(metrics)
    return metrics, ffn_bytes, source


def run_eval(config: EvalConfig) -> dict[str, Any]:
    """Evaluate ``config.methods`` at ``config.budgets`` on ``config.model``; return the results
    record (see ``report.write_results`` for files). The loaded model is never modified: this is
    checked after every method.

    Example:
        >>> # minutes of work: tests/eval/test_harness.py runs it end to end
        >>> results = run_eval(EvalConfig.from_preset("quick", model="minilm", results_md=None))  # doctest: +SKIP
        >>> [row["method"] for row in results["rows"]][:2]  # doctest: +SKIP
        ['dense', 'wanda']
    """
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_eval(config)
    finally:
        torch.set_num_threads(threads)  # the caller's setting: dense_above="auto" depends on it


def _run_eval(config: EvalConfig) -> dict[str, Any]:
    from .report import environment

    torch.manual_seed(config.seed)
    started = time.time()
    methods = [get_method(name) for name in (config.methods or method_names())]
    loaded = load_model(config.model)
    if is_compressed(loaded.model):  # a tardis checkpoint: measured as it is, under "dense"
        others = [m.name for m in methods if m.name != "dense"]
        if config.methods and others:
            raise ValueError(f"{config.model!r} is a compressed tardis checkpoint, evaluated as it is: drop "
                             f"--methods {' '.join(others)} (compare methods on the dense model it came from)")
        methods = [get_method("dense")]
    context_length = check_context(loaded.model, config.context_length
                                   or loaded.spec.default_context)
    data = prepare_data(loaded, config, context_length)
    fingerprint = _fingerprint(loaded.model)

    plan = [(m, b) for m in methods for b in (config.budgets if m.uses_budget else (1.0,))]
    rows, skipped = [], []
    for method, budget in tqdm(plan, desc=f"eval {config.model}", disable=not config.progress):
        begin = time.time()
        try:
            prepared = method.fn(loaded.model, data.calibration, budget)
        except MethodNotApplicable as exc:  # e.g. tardis on gated FFNs: say why, run the rest
            skipped.append({"method": method.name, "budget": budget, "reason": str(exc)})
            continue
        prepared_at = time.time()
        metrics, ffn_bytes, source = measure(prepared, loaded, data, context_length,
                                             progress=config.progress, scorer=config.scorer)
        if _fingerprint(loaded.model) != fingerprint:
            raise RuntimeError(f"method {method.name!r} modified the dense model in place; methods "
                               f"must work on a copy (copy.deepcopy) or wrap the model")
        rows.append({"method": method.name, "budget": budget, "metrics": metrics,
                     "ffn_bytes": ffn_bytes.to_dict(), "bytes_source": source,
                     "ffn_read_fraction_calibration": prepared.ffn_bytes.read_fraction,
                     "details": prepared.details,
                     "seconds": {"prepare": round(prepared_at - begin, 2),
                                 "evaluate": round(time.time() - prepared_at, 2)}})
        del prepared
        gc.collect()
    return {"schema": "tardis-eval/1", "config": config.to_dict(), "run": environment(config),
            "model": {"name": config.model, "package": loaded.spec.package,
                      "kind": loaded.spec.kind, "class": type(loaded.model).__name__,
                      "dtype": str(next(loaded.model.parameters()).dtype),
                      "context_length": context_length},
            "data": data.summary(), "rows": rows, "skipped": skipped,
            "seconds": round(time.time() - started, 1)}


def _fingerprint(model: torch.nn.Module) -> tuple:
    # In-place edits bump a tensor's _version; reassigned weights change data_ptr.
    return tuple((name, p.data_ptr(), p._version) for name, p in model.named_parameters())
