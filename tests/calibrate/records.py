"""FFN records with random weights and inputs, for the calibration step tests."""
import torch

from tardis_compiler.calibrate.record import FFNRecord


def gaussian_inputs(r, tokens: int, d: int) -> torch.Tensor:
    """Standard normal inputs, drawn with ``r`` (a seeded ``randn``)."""
    return r(tokens, d)


def skewed_inputs(r, tokens: int, d: int) -> torch.Tensor:
    """Skewed inputs driven by a few latent factors, as real FFN inputs are: with Gaussian ones a
    neuron's nonlinearity carries no information about the other directions of x, and a linear
    map of x can only tie the per-neuron line."""
    latent = (0.8 * r(tokens, 8)).exp() - 1
    return latent @ r(8, d) / 2 + 0.1 * r(tokens, d)


def gated_record(seed: int = 0, d: int = 32, m: int = 128, tokens: int = 3000, bias: bool = False,
                 inputs=gaussian_inputs) -> FFNRecord:
    """A gated FFN (SiLU, m neurons of d inputs) with random weights and ``tokens`` recorded inputs."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = {"wg_rows": r(m, d) / 3 - 0.05, "bg": r(m) - 1.0 if bias else None, "wu_rows": r(m, d) / 4,
         "bu": r(m) if bias else None, "wd_rows": r(m, d) / 8, "bd": r(d) if bias else None}
    rec = FFNRecord("mlp", "gated", "silu", w, max_tokens=tokens, seed=seed)
    rec.add(inputs(r, tokens, d))
    return rec
