"""Accuracy metrics: perplexity, zero-shot log-likelihood scoring, LAMBADA, embedding cosine.

Every metric calls the model only through its ``forward`` (``model(input_ids, ...)``), never
through submodules, so a ``torch.compile``-wrapped model is measured as compiled.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..runtime.ffn_op import every_token_through_packs
from .tasks import Task


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """exp(mean negative log-likelihood) over ``tokens`` scored tokens in ``windows`` windows."""

    value: float
    nll: float
    tokens: int
    windows: int


@torch.no_grad()
@every_token_through_packs()  # the approximation on every token: what decode runs
def perplexity(model: torch.nn.Module, windows: Sequence[torch.Tensor],
               prefix: Sequence[int] = (), *, progress: bool = False) -> Perplexity:
    """Perplexity over non-overlapping windows of text tokens (1-D LongTensors).

    ``prefix`` (e.g. ``[BOS]``) is prepended to every window and never scored; with a prefix every
    window token is scored, without one the first token of a window has no context and is skipped.

    Example:
        >>> class Uniform(torch.nn.Module):
        ...     def forward(self, input_ids):
        ...         return torch.zeros(*input_ids.shape, 10)
        >>> round(perplexity(Uniform(), [torch.arange(5)]).value, 3)
        10.0
    """
    prefix_ids = torch.tensor(list(prefix), dtype=torch.long)
    first_scored = max(len(prefix_ids), 1)  # position of the first scored token in the input
    total_nll, total_tokens = 0.0, 0
    for window in tqdm(windows, desc="perplexity", leave=False, disable=not progress):
        ids = torch.cat([prefix_ids, window.long()]).unsqueeze(0)
        if ids.shape[1] <= first_scored:
            continue
        logits = _logits(model(ids))[0, first_scored - 1:-1]
        targets = ids[0, first_scored:]
        total_nll += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
        total_tokens += int(targets.numel())
    if total_tokens == 0:
        raise ValueError("perplexity needs at least one window with a token to score")
    return Perplexity(math.exp(total_nll / total_tokens), total_nll, total_tokens, len(windows))


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


@dataclasses.dataclass(frozen=True)
class Continuation:
    """Score of one continuation: summed log-probability and whether greedy decoding produces it."""

    logprob: float
    greedy: bool


@torch.no_grad()
@every_token_through_packs()  # the approximation on every token: what decode runs
def score_continuations(model: torch.nn.Module, requests: Sequence[tuple[list[int], list[int]]],
                        *, max_length: int, max_batch_tokens: int = 4096,
                        progress: bool = False, desc: str = "scoring") -> list[Continuation]:
    """Log-likelihood of each ``(context_ids, continuation_ids)`` request, batched.

    Requests are sorted by length and left-padded, so every continuation ends at the last position
    and only the last few positions' logits are computed (``logits_to_keep``). Inputs longer than
    ``max_length`` lose tokens from the left of the context, as in lm-eval. Models whose forward
    takes no ``position_ids`` run unpadded, one request at a time.

    Example:
        >>> class Uniform(torch.nn.Module):
        ...     def forward(self, input_ids):
        ...         return torch.zeros(*input_ids.shape, 4)
        >>> round(score_continuations(Uniform(), [([1, 2], [3])], max_length=8)[0].logprob, 4)
        -1.3863
    """
    accepts = _forward_parameters(model)
    can_pad = "position_ids" in accepts and "attention_mask" in accepts
    keep_logits = "logits_to_keep" in accepts
    sequences = []
    for context, continuation in requests:
        if not continuation or not context:
            raise ValueError("every request needs a context token (or a BOS prefix) and at least "
                             "one continuation token")
        ids = (list(context) + list(continuation))[-max_length:]
        sequences.append((ids, min(len(continuation), len(ids) - 1)))
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
    batches, current, widest, scored = [], [], 0, 0
    for index in order:
        ids, n = sequences[index]
        # Sorted longest first, so the first row sets the padded width. The kept logits are
        # [rows, longest continuation + 1, vocab]: bound them too (vocab is 49k for SmolLM2).
        grow_width, grow_scored = max(widest, len(ids)), max(scored, n + 1)
        rows = len(current) + 1
        if current and (not can_pad or grow_width * rows > max_batch_tokens
                        or grow_scored * rows > max_batch_tokens // 8):
            batches.append(current)
            current, grow_width, grow_scored = [], len(ids), n + 1
        current.append(index)
        widest, scored = grow_width, grow_scored
    if current:
        batches.append(current)

    results: list[Continuation | None] = [None] * len(sequences)
    for batch in tqdm(batches, desc=desc, leave=False, disable=not progress):
        width = max(len(sequences[i][0]) for i in batch)
        longest_continuation = max(sequences[i][1] for i in batch)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, i in enumerate(batch):
            ids = sequences[i][0]
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        kwargs: dict[str, Any] = {}
        if can_pad:
            kwargs["attention_mask"] = mask
            kwargs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
        if keep_logits:
            # Positions as a tensor, not an int: dynamo specialises on ints, so a compiled model
            # would retrace for every new continuation length.
            kwargs["logits_to_keep"] = torch.arange(width - longest_continuation - 1, width)
        for tensor in (input_ids, *kwargs.values()):
            # Batches vary in rows and width: a compiled model traces them once, symbolically,
            # rather than once static and again dynamic (no effect on an eager model).
            for dim in range(tensor.dim()):
                torch._dynamo.maybe_mark_dynamic(tensor, dim)
        logits = _logits(model(input_ids, **kwargs))[:, -(longest_continuation + 1):-1]
        for row, i in enumerate(batch):
            ids, n = sequences[i]
            target = torch.tensor(ids[-n:])
            row_logprobs = F.log_softmax(logits[row, -n:].float(), dim=-1)  # only scored positions
            picked = row_logprobs.gather(1, target[:, None]).squeeze(1)
            greedy = bool((row_logprobs.argmax(-1) == target).all())
            results[i] = Continuation(float(picked.sum()), greedy)
    return results  # type: ignore[return-value]


def _forward_parameters(model: torch.nn.Module) -> set[str]:
    # torch.compile wraps the module; its signature lives on the original.
    inner = getattr(model, "_orig_mod", model)
    try:
        parameters = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return set()
    return set(parameters)


def evaluate_task(model: torch.nn.Module, tokenizer: Any, task: Task, *, prefix: Sequence[int] = (),
                  max_length: int = 2048, progress: bool = False) -> dict[str, float]:
    """Zero-shot metrics of ``task``, the project's fast scorer: ``acc`` and ``acc_norm`` for
    multiple choice (acc_norm divides each choice's log-likelihood by its length in characters, like
    lm-eval), ``acc`` (greedy exact match of the last word) and ``ppl`` for LAMBADA; each accuracy
    with its standard error, and ``correct``: per item, 0/1, the headline accuracy (acc_norm, or
    LAMBADA's acc). ``lmeval.evaluate_tasks`` is the same through lm-eval; their agreement is tested.

    Example:
        >>> # needs a causal LM (SmolLM2, ~20 s to load): tests/eval/test_metrics.py runs it
        >>> evaluate_task(causal_lm, causal_tokenizer, load_task("piqa", limit=20))  # doctest: +SKIP
        {'acc': 0.65, 'acc_stderr': 0.109424, 'acc_norm': 0.7, 'acc_norm_stderr': 0.105131, 'n': 20, 'correct': [...]}
    """
    requests, owners = [], []
    for q, item in enumerate(task.items):
        context_ids = tokenizer(item.context, add_special_tokens=False)["input_ids"]
        for c, continuation in enumerate(item.continuations):
            whole = tokenizer(item.context + continuation, add_special_tokens=False)["input_ids"]
            # Split the joint encoding at the context's length, so the boundary is tokenized as the
            # model would see it in running text (lm-eval does the same).
            split = min(len(context_ids), len(whole) - 1)
            requests.append((list(prefix) + whole[:split], whole[split:]))
            owners.append((q, c))
    scores = score_continuations(model, requests, max_length=max_length, progress=progress,
                                 desc=task.name)
    if task.kind == "last_word":
        mean_logprob = sum(s.logprob for s in scores) / len(scores)
        return {**accuracy("acc", [s.greedy for s in scores]), "ppl": math.exp(-mean_logprob),
                "n": len(scores), "correct": [int(s.greedy) for s in scores]}

    per_item: list[list[tuple[float, float]]] = [[] for _ in task.items]
    for (q, c), score in zip(owners, scores):
        text = task.items[q].continuations[c]
        chars = len(text[1:] if text.startswith(" ") else text)
        per_item[q].append((score.logprob, score.logprob / max(chars, 1)))
    right = [max(range(len(choices)), key=lambda c: choices[c][0]) == item.label
             for item, choices in zip(task.items, per_item)]
    right_norm = [max(range(len(choices)), key=lambda c: choices[c][1]) == item.label
                  for item, choices in zip(task.items, per_item)]
    return {**accuracy("acc", right), **accuracy("acc_norm", right_norm), "n": len(task.items),
            "correct": [int(r) for r in right_norm]}


def accuracy(name: str, outcomes: Sequence[bool]) -> dict[str, float]:
    """``{name: mean, name + "_stderr": its standard error}`` of 0/1 ``outcomes``, the standard error
    with the sample variance (n - 1), as lm-eval reports it.

    Example:
        >>> accuracy("acc", [True, False, True, False])
        {'acc': 0.5, 'acc_stderr': 0.288675}
    """
    n = len(outcomes)
    mean = sum(outcomes) / n
    stderr = math.sqrt(mean * (1 - mean) / (n - 1)) if n > 1 else float("nan")
    return {name: mean, f"{name}_stderr": round(stderr, 6)}


def _task_metrics(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in metrics.values() if isinstance(m, dict) and "acc" in m]


def mean_accuracy(metrics: dict[str, Any]) -> float:
    """Mean over tasks of acc_norm (multiple choice) or acc (LAMBADA): the accuracy summary.

    Example:
        >>> mean_accuracy({"piqa": {"acc": 0.6, "acc_norm": 0.7}, "lambada": {"acc": 0.3}})
        0.5
    """
    scores = [m.get("acc_norm", m["acc"]) for m in _task_metrics(metrics)]
    return sum(scores) / len(scores)


def mean_accuracy_stderr(metrics: dict[str, Any]) -> float:
    """Standard error of ``mean_accuracy``: the tasks' standard errors combined as independent.

    Example:
        >>> round(mean_accuracy_stderr({"a": {"acc": 0.5, "acc_stderr": 0.03},
        ...                             "b": {"acc": 0.5, "acc_stderr": 0.04}}), 4)
        0.025
    """
    tasks = _task_metrics(metrics)
    errors = [m.get("acc_norm_stderr" if "acc_norm" in m else "acc_stderr", float("nan"))
              for m in tasks]
    return math.sqrt(sum(e * e for e in errors)) / len(errors)


def paired_difference(metrics: dict[str, Any], reference: dict[str, Any]) -> tuple[float, float] | None:
    """Mean accuracy of ``metrics`` minus that of ``reference`` (same items), and the standard
    error of that difference from the per-item differences: far smaller than the unpaired one,
    since two methods mostly get the same items right. None when per-item outcomes are missing.

    Example:
        >>> paired_difference({"t": {"acc": 0.5, "correct": [1, 0, 1, 0]}},
        ...                   {"t": {"acc": 0.75, "correct": [1, 1, 1, 0]}})
        (-0.25, 0.25)
    """
    differences, variances, count = 0.0, 0.0, 0
    for name, task in metrics.items():
        other = reference.get(name)
        if not (isinstance(task, dict) and isinstance(other, dict) and "correct" in task
                and "correct" in other and len(task["correct"]) == len(other["correct"])):
            if isinstance(task, dict) and "acc" in task:
                return None
            continue
        d = [a - b for a, b in zip(task["correct"], other["correct"])]
        mean = sum(d) / len(d)
        var = sum((x - mean) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else float("nan")
        differences, variances, count = differences + mean, variances + var / len(d), count + 1
    if count == 0:
        return None
    return differences / count, math.sqrt(variances) / count


@torch.no_grad()
@every_token_through_packs()  # the approximation on every token: what decode runs
def sentence_embeddings(model: torch.nn.Module, tokenizer: Any, texts: Sequence[str], *,
                        max_length: int = 256, progress: bool = False) -> torch.Tensor:
    """MiniLM-style sentence embeddings: mean of the last hidden states over real tokens,
    L2-normalised. One text per call, so no padding reaches the model (byte meters count only
    real tokens).

    Example:
        >>> emb = sentence_embeddings(model, tokenizer, ["A cat.", "A dog."])
        >>> emb.shape
        torch.Size([2, 384])
    """
    rows = []
    for text in tqdm(texts, desc="embeddings", leave=False, disable=not progress):
        encoded = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        output = model(**encoded)
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        rows.append(F.normalize(hidden[0].float().mean(0), dim=-1))
    return torch.stack(rows)


def embedding_cosine(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Cosine similarity between matching rows of two embedding matrices: mean and 5th
    percentile (the tail is where a compressor breaks first).

    Example:
        >>> embedding_cosine(torch.eye(2), torch.eye(2))
        {'cosine_mean': 1.0, 'cosine_p05': 1.0}
    """
    cosine = F.cosine_similarity(reference.float(), candidate.float(), dim=-1)
    return {"cosine_mean": round(float(cosine.mean()), 6),
            "cosine_p05": round(float(torch.quantile(cosine, 0.05)), 6)}
