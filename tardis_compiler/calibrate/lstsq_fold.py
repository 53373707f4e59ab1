"""The least-squares fold: one linear map for everything the mix always approximates.

Neurons folded without a guard contribute ``sum_i h_i(x) w_i`` (``h_i`` the neuron's hidden value,
``w_i`` its output column) whatever the token. Per-neuron lines or constants approximate each
``h_i`` by a function of its own pre-activation; a regression of ``h_i`` on the whole input x
contains those in its span, so it is never worse on the tokens it is fitted to. The best linear
map for the total contribution of a set F is ``W_out[F] B_F`` with ``B_F`` the per-neuron
regressions (least squares is linear in its targets), so fitting each neuron once, before the
knapsack chooses F, gives both the per-neuron errors the knapsack prices and, afterwards, the
joint term in closed form.

Each regression is ridge-regularised on centred data, with one ridge per FFN chosen on a seeded
share of the fitting tokens (``VALIDATION_FRACTION``) and then refitted on all of them. The fused
op keeps the per-neuron lines of guarded neurons (its corrections subtract exactly those), and
adds the fitted term ``W_out[F] B_F`` to the folded matrix: with ``guard="all"`` the pack leaves
the term out, so the op still reproduces the dense FFN (``runtime/pack.py``).

``fitted_fold_term`` builds that term for the neurons a chosen mix folds without a guard, and
``fold_term_output`` is what it adds to the FFN's output, for both FFN kinds.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .policy import Choice, NeuronOptions

#: Share of the fitting tokens the ridge is chosen on.
VALIDATION_FRACTION = 0.2
#: Ridges tried, as multiples of the mean eigenvalue of the centred input Gram matrix.
RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)


@dataclasses.dataclass
class NeuronRegressions:
    """Per-neuron ridge regressions ``h_i ~ (x - mean_x) . coef[:, i] + mean_h_i``.

    ``error[i]``: neuron i's expected squared residual on new tokens (what folding it costs the
    output, before its column's norm): the in-sample residual inflated by generalised
    cross-validation's ``1 / (1 - dof / n)^2``, so it is on the same footing as the other options'
    in-sample errors yet does not reward fitting noise with d + 1 parameters.

    Example:
        >>> x = torch.randn(2000, 8); h = torch.stack([x[:, 0] * 2 + 1, x[:, 1].relu()], 1)
        >>> reg = NeuronRegressions.fit(x, h, torch.ones(2))
        >>> round(reg.error[0].item(), 3), bool(reg.error[1] > 0.05)
        (0.0, True)
    """

    mean_x: torch.Tensor  # (d,) float64
    mean_h: torch.Tensor  # (m,) float64
    coef: torch.Tensor  # (d, m) float32
    error: torch.Tensor  # (m,) float64
    ridge: float  # relative to the mean eigenvalue

    @classmethod
    def fit(cls, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, seed: int = 0) -> "NeuronRegressions":
        """Fit on tokens ``x`` (n, d) and hidden values ``h`` (n, m); ``weight`` (m,) weighs each
        neuron's validation error when choosing the ridge (its output column's squared norm)."""
        n = x.shape[0]
        n_val = int(n * VALIDATION_FRACTION) if n >= 50 else 0
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        val, train = perm[:n_val], perm[n_val:]
        ridge = RIDGES[2]  # too few tokens to hold any out: a mild default
        if n_val:
            stats = _Moments(x[train], h[train])
            errors = {r: stats.validation_error(r, x[val], h[val]) for r in RIDGES}
            ridge = min(RIDGES, key=lambda r: float((errors[r] * weight.double()).sum()))
        full = _Moments(x, h)
        coef = full.solve(ridge)
        in_sample = (h.float() - full.predict(coef, x).float()).square().mean(0).double()
        dof = 1 + float((full.eigval / (full.eigval + ridge * full.scale)).sum())  # + the intercept
        error = in_sample / max(1.0 - dof / n, 0.05) ** 2
        return cls(full.mean_x, full.mean_h, coef.float(), error, ridge)

    def term(self, neurons: torch.Tensor, out_rows: torch.Tensor) -> torch.Tensor:
        """``[W | b]`` (d_out, d + 1), float32: the map ``x -> W x + b`` that stands in for the total
        contribution ``sum_{i in neurons} h_i(x) out_rows[i]`` (out_rows: (m, d_out))."""
        out = out_rows.double().index_select(0, neurons)  # (k, d_out)
        coef = self.coef.double().index_select(1, neurons)  # (d, k)
        weight = out.t() @ coef.t()  # (d_out, d)
        bias = out.t() @ (self.mean_h.index_select(0, neurons) - coef.t() @ self.mean_x)
        return torch.cat([weight, bias[:, None]], dim=1).float()


class _Moments:
    """Centred Gram matrix of x, its cross-moments with h, and its eigendecomposition."""

    def __init__(self, x: torch.Tensor, h: torch.Tensor) -> None:
        self.mean_x, self.mean_h = x.double().mean(0), h.double().mean(0)
        # float32 products over the tokens (n x d x m is the cost), float64 for the small solves.
        xc = x.float() - self.mean_x.float()
        self.gram = (xc.t() @ xc).double()
        self.cross = (xc.t() @ (h.float() - self.mean_h.float())).double()  # (d, m)
        self.eigval, self.eigvec = torch.linalg.eigh(self.gram)
        self.scale = float(self.eigval.clamp(min=0).mean().clamp(min=1e-30))

    def solve(self, ridge: float) -> torch.Tensor:
        """(G + ridge * scale * I)^-1 C, (d, m) float64."""
        self.eigval = self.eigval.clamp(min=0)
        inv = 1.0 / (self.eigval + ridge * self.scale)
        return self.eigvec @ (inv[:, None] * (self.eigvec.t() @ self.cross))

    def predict(self, coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() - self.mean_x.float()) @ coef.float() + self.mean_h.float()).double()

    def validation_error(self, ridge: float, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Mean squared residual per neuron on (x, h) of the fit at ``ridge``."""
        coef = self.solve(ridge)
        return (h.float() - self.predict(coef, x).float()).square().mean(0).double()


def fitted_fold_term(regressions: NeuronRegressions | None, opts: NeuronOptions, choice: Choice,
                     out_rows: torch.Tensor) -> torch.Tensor | None:
    """The least-squares term ``[W | b]`` standing in for every neuron the choice folds without a
    guard (module docstring); None without regressions or when no neuron is folded.

    Example:
        >>> # fitted_fold_term(cand.measure["regressions"], opts, choice, weights["wd_rows"]).shape
    """
    if regressions is None or "folded" not in opts.labels:
        return None
    folded = (choice.option == opts.labels.index("folded")).nonzero().squeeze(1)
    return regressions.term(folded, out_rows) if folded.numel() else None


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
