"""Ranges: split the recorded tokens, and fit per-neuron ranges, lines and window sums.

Per neuron i, with z_i its pre-activation over the calibration tokens: the range [l_i, u_i] is
the shortest interval holding a share of the z_i, and the line a_i z + c_i the least squares of
act(z) on the samples inside it. Window sums (``prefix_sums``) give every window's line or
constant in O(1), which the per-neuron options of both FFN kinds scan (``plain.py``, ``gated.py``).
"""
from __future__ import annotations

import math

import torch

from ..config import CalibrationConfig


def split_tokens(x: torch.Tensor, config: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Seeded split of recorded tokens into (fit, holdout, what stats are measured on); sets of
    fewer than 20 tokens get no holdout.

    Example:
        >>> fit, hold, on = split_tokens(torch.randn(100, 4), CalibrationConfig(holdout_fraction=0.2))
        >>> fit.shape[0], hold.shape[0], on
        (80, 20, 'holdout')
    """
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(config.seed))
    n_hold = int(x.shape[0] * config.holdout_fraction) if x.shape[0] >= 20 else 0
    measured_on = "holdout" if n_hold else "fit tokens (too few for a holdout)"
    return x[perm[n_hold:]], x[perm[:n_hold]], measured_on


def shortest_intervals(z: torch.Tensor, coverage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``z`` (tokens, neurons), the shortest interval holding ``coverage`` of it.

    Example:
        >>> lo, hi = shortest_intervals(torch.tensor([[0.], [1.], [2.], [10.]]), 0.75)
        >>> lo.item(), hi.item()
        (0.0, 2.0)
    """
    n = z.shape[0]
    k = max(1, min(n, math.ceil(coverage * n)))
    ordered, _ = z.sort(dim=0)
    widths = ordered[k - 1:] - ordered[: n - k + 1]
    start = widths.argmin(dim=0)
    cols = torch.arange(z.shape[1])
    return ordered[start, cols].clone(), ordered[start + k - 1, cols].clone()


def fit_lines(z: torch.Tensor, y: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor):
    """Per-column least-squares line y ~ a z + c over the samples inside [lower, upper].

    Columns whose in-range samples are (nearly) constant in z get a = 0, c = mean(y).

    Example:
        >>> z = torch.linspace(-1, 1, 50)[:, None]
        >>> a, c = fit_lines(z, 3 * z + 1, torch.tensor([-1.]), torch.tensor([1.]))
        >>> round(a.item(), 4), round(c.item(), 4)
        (3.0, 1.0)
    """
    inside = ((z >= lower) & (z <= upper)).double()
    zd, yd = z.double(), y.double()
    n = inside.sum(0).clamp(min=1)
    mean_z = (inside * zd).sum(0) / n
    mean_y = (inside * yd).sum(0) / n
    dz = (zd - mean_z) * inside
    var = (dz * dz).sum(0)
    cov = (dz * (yd - mean_y)).sum(0)
    flat = var <= 1e-12 * n
    slope = torch.where(flat, torch.zeros_like(var), cov / var.clamp(min=1e-30))
    intercept = mean_y - slope * mean_z
    return slope.float(), intercept.float()


def max_line_error(act, slope, intercept, lower, upper, points: int = 257) -> torch.Tensor:
    """max over [lower, upper] of |act(z) - (slope z + intercept)|, per neuron, on a fine grid.

    Example:
        >>> one = torch.ones(1)
        >>> max_line_error(torch.relu, 0.5 * one, 0.5 * one, -one, one)   # relu's chord on [-1, 1]
        tensor([0.5000])
    """
    t = torch.linspace(0, 1, points, dtype=torch.float64)[:, None]
    grid = lower.double() + t * (upper.double() - lower.double())
    err = act(grid) - (slope.double() * grid + intercept.double())
    return err.abs().amax(0).float()


def prefix_sums(v: torch.Tensor) -> torch.Tensor:
    """Column-wise prefix sums with a leading zero row: window sums are differences of two rows.

    Example:
        >>> s = prefix_sums(torch.tensor([[1.], [2.], [3.]]))
        >>> s.squeeze(1).tolist(), (s[3] - s[1]).item()      # the window of rows 1..2
        ([0.0, 1.0, 3.0, 6.0], 5.0)
    """
    return torch.cat([torch.zeros(1, v.shape[1], dtype=v.dtype), v.cumsum(0)])
