"""The least-squares fold: one linear map for what the neuron mix leaves wrong.

Once each neuron has its option, the op's output on a token differs from the dense FFN's by
``e(x) = sum_i [i not on the exact path] (line_i(x) - h_i(x)) w_i`` (``h_i`` the neuron's hidden
value, ``line_i`` its line or constant, ``w_i`` its output column): the whole error of neurons
folded without a guard or dropped, and the in-range error of guarded ones. ``e`` is nonlinear in
x, but its linear part can be removed for free: a map ``M x + b`` fitted to ``-e(x)`` on the
calibration tokens joins the folded matrix ``Wf``, which the op reads anyway. Ridge least squares
in closed form (normal equations on centred data, via one eigendecomposition of the input Gram
matrix) is never worse than adding nothing on the tokens it is fitted to: ``M = 0`` is a candidate.

The ridge is chosen on a seeded share of the fitting tokens (``VALIDATION_FRACTION``), the term
is then refitted on all of them; where no ridge beats adding nothing on that share, there is no
term. Only FFNs whose mix has a folded matrix get one (without ``Wf`` it would add d x d bytes).

Guarded neurons keep their per-neuron line or constant, the one the exact path subtracts when it
flags them, and the term is kept apart in the profile (``FFNProfile.fold_term``): with
``guard="all"`` (every neuron exact) the pack leaves it out, so the op still reproduces the dense
FFN (``runtime/pack.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: Share of the fitting tokens the ridge is chosen on.
VALIDATION_FRACTION = 0.2
#: Ridges tried, as multiples of the mean eigenvalue of the centred input Gram matrix.
RIDGES = (1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)


def fit_fold_term(x: torch.Tensor, residual: torch.Tensor, seed: int = 0) -> torch.Tensor | None:
    """``[W | b]`` (d_out, d_in + 1), float32: the ridge least-squares map ``x -> W x + b`` closest to
    ``residual`` (n, d_out) on tokens ``x`` (n, d_in), or None where it does not help on held-out
    tokens (module docstring).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(2000, 8); r = x @ torch.randn(8, 3) + 1.0 + 0.1 * torch.randn(2000, 3)
        >>> term = fit_fold_term(x, r)
        >>> bool(((fold_term_output(term, x) - r).square().mean() < 0.02).item())
        True
    """
    n = x.shape[0]
    n_val = int(n * VALIDATION_FRACTION)
    if n_val < 16 or n - n_val < 16:
        return None
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val], perm[n_val:]
    moments = _Moments(x[train], residual[train])
    baseline = residual[val].float().square().sum().item()  # adding nothing
    errors = {r: moments.validation_error(r, x[val], residual[val]) for r in RIDGES}
    ridge = min(RIDGES, key=errors.__getitem__)
    if errors[ridge] >= baseline:
        return None
    full = _Moments(x, residual)
    coef = full.solve(ridge)  # (d_in, d_out)
    bias = full.mean_r - coef.t() @ full.mean_x
    return torch.cat([coef.t(), bias[:, None]], dim=1).float()


def fold_term_output(fold_term: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | float:
    """What the least-squares term adds to the output for tokens ``x`` (0.0 without one).

    Example:
        >>> term = torch.tensor([[2.0, 0.0, 1.0]])          # y = 2 x_0 + 1
        >>> fold_term_output(term, torch.tensor([[3.0, 5.0]])), fold_term_output(None, torch.ones(1, 2))
        (tensor([[7.]]), 0.0)
    """
    if fold_term is None:
        return 0.0
    return F.linear(x, fold_term[:, :-1], fold_term[:, -1])


class _Moments:
    """Centred Gram matrix of x, its cross-moments with the residual, and its eigendecomposition."""

    def __init__(self, x: torch.Tensor, r: torch.Tensor) -> None:
        self.mean_x, self.mean_r = x.double().mean(0), r.double().mean(0)
        # float32 products over the tokens (n x d x d_out is the cost), float64 for the small solves.
        xc = x.float() - self.mean_x.float()
        self.cross = (xc.t() @ (r.float() - self.mean_r.float())).double()  # (d_in, d_out)
        eigval, self.eigvec = torch.linalg.eigh((xc.t() @ xc).double())
        self.eigval = eigval.clamp(min=0)
        self.scale = float(self.eigval.mean().clamp(min=1e-30))

    def solve(self, ridge: float) -> torch.Tensor:
        """(G + ridge * scale * I)^-1 C, (d_in, d_out) float64."""
        inv = 1.0 / (self.eigval + ridge * self.scale)
        return self.eigvec @ (inv[:, None] * (self.eigvec.t() @ self.cross))

    def validation_error(self, ridge: float, x: torch.Tensor, r: torch.Tensor) -> float:
        """Summed squared error on (x, r) of the fit at ``ridge``."""
        coef = self.solve(ridge).float()
        predicted = (x.float() - self.mean_x.float()) @ coef + self.mean_r.float()
        return (r.float() - predicted).square().sum().item()
