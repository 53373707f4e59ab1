"""record.py: the token reservoir."""
import torch

from tardis_compiler.calibrate.record import FFNRecord


def test_reservoir_keeps_at_most_max_tokens_from_all_batches():
    rec = FFNRecord("f", "p", "gelu", {}, max_tokens=64, seed=0)
    for i in range(10):
        rec.add(torch.full((32, 4), float(i)))
    kept = rec.tokens()
    assert kept.shape == (64, 4) and rec.seen == 320
    assert len(set(kept[:, 0].tolist())) > 3  # later batches are represented
