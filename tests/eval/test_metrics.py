"""metrics.py: perplexity of models with known logits, BOS handling, batched scoring, acc vs
acc_norm, embedding cosine."""
import math

import pytest
import torch

from tardis_compiler.eval.metrics import (embedding_cosine, evaluate_task, perplexity,
                                          score_continuations, sentence_embeddings)
from tardis_compiler.eval.tasks import Task, TaskItem

from tests.eval.helpers import tiny_bert, tiny_llama


class FixedLogits(torch.nn.Module):
    """Same logits at every position: log-probabilities ``log_softmax(logits)``."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, **_):
        return self.logits.expand(*input_ids.shape, -1)


class PredictNext(torch.nn.Module):
    """Puts probability ``p`` on token (id + 1) mod V and spreads the rest uniformly."""

    def __init__(self, vocab: int, p: float) -> None:
        super().__init__()
        self.vocab, self.p = vocab, p

    def forward(self, input_ids, **_):
        other = (1 - self.p) / (self.vocab - 1)
        probs = torch.full((*input_ids.shape, self.vocab), other)
        probs.scatter_(-1, ((input_ids + 1) % self.vocab)[..., None], self.p)
        return probs.log()


def test_uniform_model_has_perplexity_equal_to_vocabulary_size():
    result = perplexity(FixedLogits(torch.zeros(50)), [torch.arange(10), torch.arange(7)])
    assert result.value == pytest.approx(50.0)
    assert result.tokens == 9 + 6  # without a prefix the first token of a window is not scored
    assert result.windows == 2


def test_known_next_token_probability():
    # Counting sequence: every scored token is the predicted one, probability 0.8.
    result = perplexity(PredictNext(vocab=20, p=0.8), [torch.arange(12)])
    assert result.value == pytest.approx(1 / 0.8)
    assert result.nll == pytest.approx(-11 * math.log(0.8))


def test_bos_prefix_is_prepended_but_never_scored():
    # With BOS=19, token 0 follows it and is predicted (19 + 1) % 20 = 0: all 12 tokens scored.
    result = perplexity(PredictNext(vocab=20, p=0.8), [torch.arange(12)], prefix=[19])
    assert result.tokens == 12
    assert result.value == pytest.approx(1 / 0.8)


def test_score_continuations_padding_does_not_change_scores():
    model = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    requests = [(torch.randint(0, 128, (n,), generator=generator).tolist(),
                 torch.randint(0, 128, (c,), generator=generator).tolist())
                for n, c in [(5, 1), (12, 3), (3, 2), (20, 4), (8, 1)]]
    batched = score_continuations(model, requests, max_length=64, max_batch_tokens=1024)
    alone = score_continuations(model, requests, max_length=64, max_batch_tokens=1)
    for a, b in zip(batched, alone):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert a.greedy == b.greedy


def test_score_continuations_matches_a_direct_computation():
    model = tiny_llama()
    context, continuation = [3, 17, 5, 9], [11, 2]
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0], dim=-1)
    expected = float(logprobs[3, 11] + logprobs[4, 2])
    greedy = bool(logprobs[3].argmax() == 11 and logprobs[4].argmax() == 2)
    [score] = score_continuations(model, [(context, continuation)], max_length=64)
    assert score.logprob == pytest.approx(expected, abs=1e-5)
    assert score.greedy == greedy


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_acc_and_acc_norm_disagree_when_length_matters():
    # The model likes "a" (logit 5) over everything else (0) in a 128-symbol vocabulary, so a long
    # run of a's has the lower total log-likelihood but the higher per-character one.
    logits = torch.zeros(128)
    logits[ord("a")] = 5.0
    task = Task("toy", "multiple_choice",
                (TaskItem("Q:", (" aaaaaaaaaa", " c"), label=0),
                 TaskItem("Q:", (" b", " aaa"), label=1)))
    metrics = evaluate_task(FixedLogits(logits), CharTokenizer(), task, max_length=64)
    assert {k: metrics[k] for k in ("acc", "acc_norm", "n", "correct")} == {"acc": 0.5, "acc_norm": 1.0, "n": 2,
                                                                             "correct": [1, 1]}
    assert metrics["acc_stderr"] == pytest.approx(0.5) and metrics["acc_norm_stderr"] == 0.0


def test_lambada_accuracy_is_greedy_exact_match():
    # ord("/") + 1 == ord("0"), so "/" -> "0" -> "1" is what PredictNext decodes greedily;
    # "0a" breaks the sequence at its second character.
    task = Task("lambada", "last_word", (TaskItem("/", ("01",), 0), TaskItem("/", ("0a",), 0)))
    metrics = evaluate_task(PredictNext(vocab=128, p=0.9), CharTokenizer(), task, max_length=16)
    assert metrics["acc"] == 0.5 and metrics["n"] == 2
    other = 0.1 / 127
    assert metrics["ppl"] == pytest.approx(math.exp(-(2 * math.log(0.9) + math.log(0.9 * other)) / 2))


def test_embedding_cosine_of_identical_and_orthogonal_rows():
    assert embedding_cosine(torch.eye(3), torch.eye(3)) == {"cosine_mean": 1.0, "cosine_p05": 1.0}
    assert embedding_cosine(torch.eye(2), torch.eye(2).flip(0))["cosine_mean"] == 0.0


def test_sentence_embeddings_are_mean_pooled_and_normalised():
    model = tiny_bert()

    class Tok:
        def __call__(self, text, truncation=True, max_length=16, return_tensors="pt"):
            ids = torch.tensor([[ord(c) % 128 for c in text][:max_length]])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    embeddings = sentence_embeddings(model, Tok(), ["hello", "world!"])
    assert embeddings.shape == (2, 32)
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([[ord(c) for c in "hello"]])).last_hidden_state[0]
    assert torch.allclose(embeddings[0], torch.nn.functional.normalize(hidden.mean(0), dim=0), atol=1e-6)
