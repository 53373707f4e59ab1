"""FFN records with random weights and inputs, for the calibration step tests."""
import torch

from tardis_compiler.calibrate.record import FFNRecord


def gated_record(seed: int = 0, d: int = 32, m: int = 128, tokens: int = 3000, bias: bool = False) -> FFNRecord:
    """A gated FFN (SiLU, m neurons of d inputs) with random weights and ``tokens`` recorded inputs."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = {"wg_rows": r(m, d) / 3 - 0.05, "bg": r(m) - 1.0 if bias else None, "wu_rows": r(m, d) / 4,
         "bu": r(m) if bias else None, "wd_rows": r(m, d) / 8, "bd": r(d) if bias else None}
    rec = FFNRecord("mlp", "gated", "silu", w, max_tokens=tokens, seed=seed)
    rec.add(r(tokens, d))
    return rec
