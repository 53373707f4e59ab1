"""Calibration and evaluation text from the Wikipedia extract, split by article.

Calibration text and evaluation text never share an article: ``split_articles`` assigns whole
articles to one side (a seeded shuffle), and every token stream below is built from one side only.
Otherwise a method calibrated on the very text it is scored on would look better than it is.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import random
from typing import Any, Iterator, Sequence

import torch

from .errors import DatasetTooSmall
from .wiki import Article, read_articles


@dataclasses.dataclass(frozen=True)
class CorpusSplit:
    """Articles for calibration and for evaluation; disjoint by construction (checked here).

    Example:
        >>> split = split_articles([Article("a", "x"), Article("b", "y")], seed=0)
        >>> len(split.calibration), len(split.evaluation)
        (1, 1)
    """

    calibration: tuple[Article, ...]
    evaluation: tuple[Article, ...]
    seed: int

    def __post_init__(self) -> None:
        shared = {a.title for a in self.calibration} & {a.title for a in self.evaluation}
        if shared:
            raise ValueError(f"calibration and evaluation share articles: {sorted(shared)[:5]}")


def split_articles(articles: Sequence[Article], *, calibration_fraction: float = 0.25,
                   seed: int = 0) -> CorpusSplit:
    """Shuffle articles with ``seed`` and give the first ``calibration_fraction`` to calibration,
    the rest to evaluation (each side gets at least one article).

    Example:
        >>> split = split_articles([Article(str(i), "text") for i in range(8)], seed=1)
        >>> len(split.calibration), len(split.evaluation)
        (2, 6)
    """
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    unique = list({a.title: a for a in articles}.values())  # a title twice would leak across sides
    if len(unique) < 2:
        raise DatasetTooSmall(
            f"need at least 2 distinct articles to keep calibration and evaluation text apart, "
            f"got {len(unique)}; is the gensim Wikipedia extract intact (`pip install --no-deps "
            f"--force-reinstall gensim==4.4.0`)?"
        )
    order = list(range(len(unique)))
    random.Random(seed).shuffle(order)
    n_cal = min(max(1, round(calibration_fraction * len(unique))), len(unique) - 1)
    shuffled = [unique[i] for i in order]
    return CorpusSplit(tuple(shuffled[:n_cal]), tuple(shuffled[n_cal:]), seed)


@functools.lru_cache(maxsize=4)
def wikipedia_split(seed: int = 0, calibration_fraction: float = 0.25) -> CorpusSplit:
    """The gensim Wikipedia extract, split by article (cached: parsing takes a few seconds).

    Example:
        >>> split = wikipedia_split(seed=0)
        >>> len(split.calibration) + len(split.evaluation) > 100
        True
    """
    return split_articles(read_articles(), calibration_fraction=calibration_fraction, seed=seed)


def special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after text by default: ``([BOS], [])`` for LLaMA-2,
    ``([], [])`` for SmolLM2, ``([CLS], [SEP])`` for BERT. Found by comparing encodings, which
    works across tokenizer classes and versions.

    Example:
        >>> special_tokens(tokenizer)          # MiniLM's: [CLS] ... [SEP]
        ([101], [102])
    """
    plain = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    full = tokenizer("hello world")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start]), list(full[start + len(plain):])
    return [], []


def token_stream(tokenizer: Any, articles: Sequence[Article]) -> torch.Tensor:
    """All articles' tokens, without special tokens, articles joined by a blank line.

    Example:
        >>> token_stream(tokenizer, wikipedia_split().evaluation[:2]).dim()
        1
    """
    separator = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    with _quiet_transformers():  # long texts warn that they exceed model_max_length: we window them
        for i, article in enumerate(articles):
            if i:
                ids.extend(separator)
            ids.extend(tokenizer(article.text, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def token_windows(stream: torch.Tensor, length: int, *, count: int | None = None, seed: int = 0,
                  what: str = "text") -> list[torch.Tensor]:
    """Cut ``stream`` into non-overlapping windows of ``length`` tokens (the tail shorter than a
    window is dropped) and keep ``count`` of them, chosen with ``seed`` (all if ``count`` is None),
    in stream order.

    Example:
        >>> [w.tolist() for w in token_windows(torch.arange(7), 3)]
        [[0, 1, 2], [3, 4, 5]]
    """
    if length < 1:
        raise ValueError(f"window length must be >= 1, got {length}")
    available = int(stream.numel()) // length
    if available == 0 or (count is not None and count > available):
        raise DatasetTooSmall(
            f"{what}: asked for {count if count is not None else 'all'} windows of {length} tokens "
            f"but the text has {stream.numel()} tokens ({available} windows). Ask for fewer "
            f"windows or a shorter --context-length."
        )
    if count is not None and count < 1:
        raise ValueError(f"window count must be >= 1, got {count}")
    chosen = range(available) if count is None else _seeded_subset(available, count, seed)
    return [stream[i * length:(i + 1) * length].clone() for i in chosen]


def calibration_batches(tokenizer: Any, *, context_length: int = 512, num_batches: int = 16,
                        seed: int = 0, split: CorpusSplit | None = None) -> list[torch.Tensor]:
    """Calibration inputs: ``num_batches`` LongTensors of shape [1, context_length] from the
    calibration articles only, each wrapped in the tokenizer's default special tokens (so a BERT
    chunk is ``[CLS] ... [SEP]``). Feed them to ``tardis_compiler.calibrate`` or the baselines.

    Example:
        >>> batches = calibration_batches(tokenizer, context_length=512, num_batches=16)
        >>> batches[0].shape
        torch.Size([1, 512])
    """
    split = split or wikipedia_split(seed)
    prefix, suffix = special_tokens(tokenizer)
    text_length = context_length - len(prefix) - len(suffix)
    stream = token_stream(tokenizer, split.calibration)
    windows = token_windows(stream, text_length, count=num_batches, seed=seed,
                            what="calibration text")
    wrap = lambda w: torch.cat([torch.tensor(prefix, dtype=torch.long), w,  # noqa: E731
                                torch.tensor(suffix, dtype=torch.long)])
    return [wrap(w).unsqueeze(0) for w in windows]


def evaluation_windows(tokenizer: Any, *, context_length: int = 512, num_windows: int | None = None,
                       seed: int = 0, split: CorpusSplit | None = None) -> list[torch.Tensor]:
    """Perplexity text: windows of ``context_length`` minus the tokenizer's prefix (BOS) tokens,
    from the evaluation articles only; ``perplexity`` prepends the prefix. ``None`` takes all.

    Example:
        >>> windows = evaluation_windows(tokenizer, context_length=512, num_windows=32)
        >>> len(windows), windows[0].shape
        (32, torch.Size([511]))
    """
    split = split or wikipedia_split(seed)
    prefix, _ = special_tokens(tokenizer)
    stream = token_stream(tokenizer, split.evaluation)
    return token_windows(stream, context_length - len(prefix), count=num_windows, seed=seed,
                         what="evaluation text")


def evaluation_passages(*, count: int | None = None, seed: int = 0, min_words: int = 20,
                        split: CorpusSplit | None = None) -> list[str]:
    """Paragraphs of the evaluation articles with at least ``min_words`` words (sentence-embedding
    inputs), ``count`` of them chosen with ``seed`` (all if None), in article order.

    Example:
        >>> len(evaluation_passages(count=8))
        8
    """
    split = split or wikipedia_split(seed)
    paragraphs = [p for a in split.evaluation for p in a.text.split("\n\n")
                  if len(p.split()) >= min_words]
    if not paragraphs or (count is not None and count > len(paragraphs)):
        raise DatasetTooSmall(f"asked for {count} passages of >= {min_words} words, the evaluation "
                              f"articles have {len(paragraphs)}; ask for fewer.")
    if count is None:
        return paragraphs
    return [paragraphs[i] for i in _seeded_subset(len(paragraphs), count, seed)]


def _seeded_subset(population: int, count: int, seed: int) -> list[int]:
    """``count`` distinct indices below ``population``, chosen with ``seed``, in increasing order."""
    return sorted(random.Random(seed).sample(range(population), count))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
