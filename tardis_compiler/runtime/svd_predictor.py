"""A low-rank guard: the whitened truncated-SVD predictor of SVDP, and greedy per-neuron margins.

The guard (DESIGN.md 1.2) predicts the gate pre-activations ``g = W_g x`` cheaply and flags a
neuron when its prediction lies near or outside its calibrated range. ``LowBitGuard`` reads a
quantized copy of all ``m * d`` weights; ``SVDPredictor`` reads ``r * d + m * r``:

* Whitening. With calibration inputs ``X`` (n, d) and ``C = X^T X / n + damping * mean(diag) * I``
  = ``L L^T`` (Cholesky, lower), the expected squared error of any predictor ``W_hat`` on inputs
  like ``X`` is ``||(W - W_hat) L||_F^2``. The best rank-r ``W_hat`` is therefore the truncated SVD
  of ``W L``, mapped back: ``W L = U S V^T``, ``W_hat = (U_r S_r) (V_r^T L^{-1}) = Q P``. A plain
  truncated SVD of ``W`` is the special case ``C = I`` and loses to it when the input covariance
  is anisotropic (LLM hidden states are strongly so).
* ``greedy_margins`` then chooses one margin per neuron: it widens, step by step, the margin whose
  next step removes the most missed cost per extra flagged token (SVDP's greedy threshold
  calibration, with the cost ``(activation * ||W_down[:, i]||)^2``).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

DEFAULT_STEP_QUANTILES: tuple[float, ...] = tuple(i / 50 for i in range(1, 46)) + (
    0.92, 0.94, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99, 0.995, 0.998, 0.999, 1.0)
"""Candidate margins of ``greedy_margins``: these quantiles of ``|g_hat - g|`` per neuron. The last
one (the largest error) flags every out-of-range token, so any target can be met."""
_QUANTILE_SAMPLE = 2048  # candidate quantiles are read off at most this many (evenly spaced) tokens


@dataclasses.dataclass
class SVDPredictor:
    """Whitened rank-r predictor of ``x @ W.T``: ``(x @ P.T) @ Q.T`` with P (r, d), Q (m, r).

    Build it with ``SVDPredictor.build(w_rows, x_calibration, rank)``; ``predict`` has the call
    convention of ``LowBitGuard.predict`` (tokens x d in, float32 tokens x m out, no bias).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> w = torch.randn(64, 32, generator=g)
        >>> x = torch.randn(500, 32, generator=g) * torch.logspace(0, -2, 32)  # anisotropic inputs
        >>> full = SVDPredictor.build(w, x, rank=32)
        >>> torch.allclose(full.predict(x), x @ w.T, atol=1e-4, rtol=1e-4)
        True
        >>> low = SVDPredictor.build(w, x, rank=16)
        >>> low.kernel, low.P.shape, low.Q.shape
        ('svd-r16', torch.Size([16, 32]), torch.Size([64, 16]))
        >>> low.bytes_read() == (16 * 32 + 64 * 16) * 4  # vs 64 * 32 * 4 for W itself
        True
        >>> rel = ((low.predict(x) - x @ w.T).norm() / (x @ w.T).norm()).item()
        >>> rel < 0.1  # half the directions carry almost all of this input's energy
        True
    """

    P: torch.Tensor  # (rank, d) = V_r^T L^{-1}: projects x onto the kept whitened directions
    Q: torch.Tensor  # (m, rank) = U_r S_r: maps those coordinates to the m predictions
    damping: float = 1e-2

    @classmethod
    def build(cls, w_rows: torch.Tensor, x: torch.Tensor, rank: int, damping: float = 1e-2) -> "SVDPredictor":
        """Fit the rank-``rank`` predictor of ``x @ w_rows.T`` to calibration inputs ``x`` (n, d).

        Computed in float64; P and Q are stored contiguous in ``w_rows``' dtype and device.
        ``damping`` is relative: ``damping * mean(diag(X^T X / n))`` is added to the covariance's
        diagonal (so the predictor does not change when x is rescaled), which also makes n < d
        well posed. If the inputs are all zero it falls back to the absolute ``damping``.

        Raises:
            ValueError: on a non-2D ``w_rows`` or ``x``, mismatched d, no calibration tokens,
                ``rank`` outside ``[1, min(m, d)]``, negative damping, non-finite inputs, or a
                covariance that is not positive definite (e.g. n < d with ``damping=0``).
        """
        if w_rows.dim() != 2:
            raise ValueError(f"SVDPredictor.build: w_rows must be (m, d), got shape {tuple(w_rows.shape)}")
        m, d = w_rows.shape
        if x.dim() != 2 or x.shape[1] != d:
            raise ValueError(f"SVDPredictor.build: x must be (tokens, d={d}), got shape {tuple(x.shape)}")
        n = x.shape[0]
        if n == 0:
            raise ValueError("SVDPredictor.build: no calibration tokens (x has 0 rows); "
                             "the whitening needs the inputs' covariance")
        cls._check_rank(rank, m, d)
        rank = int(rank)
        if not damping >= 0:
            raise ValueError(f"SVDPredictor.build: damping must be >= 0, got {damping!r}")
        w = w_rows.detach().to(torch.float64)
        xd = x.detach().to(device=w.device, dtype=torch.float64)
        if not (torch.isfinite(w).all() and torch.isfinite(xd).all()):
            raise ValueError("SVDPredictor.build: w_rows and x must be finite")
        cov = xd.T @ xd / n
        scale = cov.diagonal().mean().item()
        cov.diagonal().add_(damping * (scale if scale > 0 else 1.0))
        chol, info = torch.linalg.cholesky_ex(cov)
        if info.item() != 0:
            raise ValueError(f"SVDPredictor.build: the input covariance (n={n} tokens, d={d}) is not "
                             f"positive definite with damping={damping}; use damping > 0 or more tokens")
        u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
        q = u[:, :rank] * s[:rank]
        # P = V_r^T L^{-1}  <=>  L^T P^T = V_r  (upper-triangular solve, no explicit inverse)
        p = torch.linalg.solve_triangular(chol.T, vh[:rank].T, upper=True).T
        return cls(P=p.to(w_rows.dtype).contiguous(), Q=q.to(w_rows.dtype).contiguous(), damping=damping)

    @classmethod
    def build_ranks(cls, w_rows: torch.Tensor, x: torch.Tensor, ranks: Sequence[int],
                    damping: float = 1e-2) -> list["SVDPredictor"]:
        """``[build(w_rows, x, r, damping) for r in ranks]``, sharing one factorization.

        Example:
            >>> w, x = torch.randn(32, 16), torch.randn(100, 16)
            >>> [p.kernel for p in SVDPredictor.build_ranks(w, x, [4, 8])]
            ['svd-r4', 'svd-r8']
        """
        ranks = list(ranks)
        if not ranks:
            return []
        if w_rows.dim() == 2:
            for r in ranks:
                cls._check_rank(r, *w_rows.shape)
        full = cls.build(w_rows, x, int(max(ranks)), damping)  # (validates everything else)
        return [cls(P=full.P[:r].contiguous(), Q=full.Q[:, :r].contiguous(), damping=damping)
                for r in map(int, ranks)]

    @staticmethod
    def _check_rank(rank, m: int, d: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, (int, float)) or int(rank) != rank \
                or not 1 <= rank <= min(m, d):
            raise ValueError(f"SVDPredictor.build: rank must be an integer in [1, min(m, d) = {min(m, d)}], "
                             f"got {rank!r}")

    @property
    def rank(self) -> int:
        return self.P.shape[0]

    @property
    def kernel(self) -> str:
        """``"svd-r{rank}"``: the name the explain report and benchmarks print for this guard."""
        return f"svd-r{self.rank}"

    def predict(self, x2d: torch.Tensor) -> torch.Tensor:
        """Predicted ``x2d @ W.T`` in float32, shape (tokens, m); leading dims other than one
        token axis are kept as they are (``(..., d) -> (..., m)``)."""
        if x2d.shape[-1] != self.P.shape[1]:
            raise ValueError(f"SVDPredictor.predict: expected inputs (..., {self.P.shape[1]}), "
                             f"got {tuple(x2d.shape)}")
        xs = x2d.to(self.P.dtype)
        return ((xs @ self.P.T) @ self.Q.T).float()

    def bytes_read(self, elem_bytes: int | None = None) -> int:
        """Weight bytes read per token: ``(r * d + m * r) * elem_bytes`` (default: the stored
        dtype's size). Activations and the (r,) intermediate are not counted."""
        eb = self.P.element_size() if elem_bytes is None else elem_bytes
        return (self.P.numel() + self.Q.numel()) * eb

    def resident_bytes(self) -> int:
        """Bytes the predictor keeps in memory (P and Q as stored)."""
        return self.P.numel() * self.P.element_size() + self.Q.numel() * self.Q.element_size()


def candidate_margins(g: torch.Tensor, g_hat: torch.Tensor,
                      step_quantiles: Sequence[float] = DEFAULT_STEP_QUANTILES) -> torch.Tensor:
    """Per-neuron candidate margins (m, 1 + len(step_quantiles)), ascending along dim 1: zero,
    then the ``step_quantiles`` of ``|g_hat - g|`` over tokens (lower order statistic; with more
    than 2048 tokens, read off 2048 evenly spaced ones, except quantile 1.0: the exact maximum).

    Example:
        >>> g = torch.zeros(5, 1); g_hat = torch.tensor([[0.], [1.], [2.], [3.], [4.]])
        >>> candidate_margins(g, g_hat, (0.5, 1.0)).tolist()
        [[0.0, 2.0, 4.0]]
    """
    diff = g_hat - g if g_hat.dtype == g.dtype and g.is_floating_point() else g_hat.double() - g.double()
    return _candidates(diff.abs().T.contiguous(), step_quantiles).double()


def _candidates(err_t: torch.Tensor, step_quantiles: Sequence[float]) -> torch.Tensor:
    """``candidate_margins`` from the neuron-major absolute errors (m, n), in their dtype."""
    qs = sorted(float(q) for q in step_quantiles)
    if not qs or qs[0] < 0 or qs[-1] > 1:
        raise ValueError(f"step_quantiles must be a non-empty sequence in [0, 1], got {step_quantiles!r}")
    n = err_t.shape[1]
    stride = -(-n // _QUANTILE_SAMPLE)  # quantiles from <= _QUANTILE_SAMPLE evenly spaced tokens
    err, _ = err_t[:, ::stride].sort(dim=1)  # sorting contiguous rows is much faster than along dim 0
    ns = err.shape[1]
    idx = torch.tensor([int(q * (ns - 1)) for q in qs], device=err.device)
    picked = err.index_select(1, idx)  # (m, K)
    if stride > 1 and qs[-1] == 1.0:
        picked[:, -1] = err_t.amax(dim=1)  # the largest error is exact: it must flag every miss
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], dim=1).contiguous()


def greedy_margins(g: torch.Tensor, g_hat: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                   cost: torch.Tensor, target_missed: float,
                   step_quantiles: Sequence[float] = DEFAULT_STEP_QUANTILES,
                   lookahead: bool = True) -> torch.Tensor:
    """Per-neuron guard margins (m,) >= 0, chosen greedily to leave at most ``target_missed`` of
    the out-of-range cost unflagged while flagging as few extra tokens as possible.

    Args:
        g: true pre-activations (tokens, m); ``g_hat``: the predictor's (tokens, m).
        lower, upper: (m,) the calibrated range of each neuron.
        cost: (tokens, m) >= 0, what missing (token, neuron) costs, e.g.
            ``((act(g) - c) * u)**2 * ||W_d[:, i]||**2``; only out-of-range entries matter.
        target_missed: allowed missed cost as a fraction of the total out-of-range cost.
        step_quantiles: candidate margins per neuron, as quantiles of ``|g_hat - g|``
            (see ``candidate_margins``); the finer, the closer to the target the result lands.
        lookahead: True (default): a neuron's step may jump past several candidates, to the one
            with the best ratio from where it stands (the greedy then walks each neuron's upper
            concave hull of removed cost vs flags). False: strictly the next candidate. The strict
            variant stalls: one noisy step that catches little parks the neuron behind every
            other, so it flags far more for the same missed cost (SmolLM2 layer 15, p = 0.85,
            1% missed on the fit tokens: flag rate 0.16 vs 0.19 with int4, 0.46 vs 0.84 with
            svd-r128).

    A token is flagged at margin mu when ``g_hat < lower + mu`` or ``g_hat > upper - mu``, i.e.
    when its slack ``s = min(g_hat - lower, upper - g_hat) < mu``; it is missed when it is out of
    range (``g < lower`` or ``g > upper``) and not flagged. The algorithm:

    1. Candidates ``0 = mu_0 <= mu_1 <= ... <= mu_K`` per neuron; by bucketing each token's slack
       among them (searchsorted) get, per candidate k, the tokens flagged ``F_k`` and the
       out-of-range cost caught ``C_k`` (both non-decreasing in k).
    2. The greedy: every neuron starts at mu_0; repeatedly widen the margin of the neuron whose
       next step (k -> k') has the largest ratio ``(C_k' - C_k) / (F_k' - F_k)`` (cost removed
       per extra flagged token), until the missed cost is <= ``target_missed * total
       out-of-range cost``. With ``lookahead`` the next step goes to the best-ratio k' > k
       (nearest on ties), else k' = k + 1. Steps that catch nothing are never taken.
    3. Vectorised exactly: list each neuron's steps in the order the greedy would take them
       (with lookahead, its hull vertices, found for all neurons at once in at most K rounds).
       A step can be taken only after the neuron's earlier ones, so the greedy takes it at the
       level ``e = min`` of the ratios of the neuron's steps up to it (a running minimum; a step
       with a higher ratio than its predecessor is taken right after it). Sorting all steps by
       (-e, neuron, step) gives the order a priority queue pops them in (ties to the lower
       neuron); a cumulative sum of the removed cost along that order finds where it stops.

    With the largest candidate (quantile 1.0, the default's last) every out-of-range token is
    flagged, so any target >= 0 is reachable. Neurons whose ranges contain all their tokens, and
    every neuron of an exact predictor, keep margin 0.

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> g = torch.randn(4000, 8, generator=gen)
        >>> g_hat = g + 0.2 * torch.randn(4000, 8, generator=gen)
        >>> lower, upper = torch.full((8,), -1.0), torch.full((8,), 1.0)
        >>> cost = torch.nn.functional.silu(g) ** 2 * torch.arange(1.0, 9.0)  # neuron 7 matters most
        >>> mu = greedy_margins(g, g_hat, lower, upper, cost, target_missed=0.01)
        >>> flagged = (g_hat < lower + mu) | (g_hat > upper - mu)
        >>> outside = (g < lower) | (g > upper)
        >>> missed = (cost * (outside & ~flagged)).sum() / (cost * outside).sum()
        >>> bool(missed <= 0.01), bool((mu >= 0).all())
        (True, True)
        >>> bool((greedy_margins(g, g, lower, upper, cost, 0.01) == 0).all())  # exact predictor
        True
    """
    if g.dim() != 2 or g.shape != g_hat.shape or g.shape != cost.shape:
        raise ValueError(f"greedy_margins: g, g_hat and cost must share one (tokens, m) shape, got "
                         f"{tuple(g.shape)}, {tuple(g_hat.shape)}, {tuple(cost.shape)}")
    n, m = g.shape
    if lower.shape != (m,) or upper.shape != (m,):
        raise ValueError(f"greedy_margins: lower and upper must be ({m},), got "
                         f"{tuple(lower.shape)}, {tuple(upper.shape)}")
    if not 0 <= target_missed <= 1:
        raise ValueError(f"greedy_margins: target_missed must be in [0, 1], got {target_missed!r}")
    if (cost < 0).any() or not torch.isfinite(cost).all():
        raise ValueError("greedy_margins: cost must be finite and >= 0")
    out_dtype = g_hat.dtype if g_hat.is_floating_point() else torch.float32
    dev = g.device
    if n == 0 or m == 0:
        return torch.zeros(m, dtype=out_dtype, device=dev)

    # Work neuron-major (m, n) in float32 unless an input is float64; the (m, K) tables in float64.
    wdt = torch.float64 if torch.float64 in (g.dtype, g_hat.dtype, cost.dtype) else torch.float32
    g_t, gh_t = g.to(wdt).T.contiguous(), g_hat.to(wdt).T.contiguous()
    lo, hi = lower.to(wdt)[:, None], upper.to(wdt)[:, None]
    out_cost = cost.to(wdt).T * ((g_t < lo) | (g_t > hi))  # cost of the out-of-range pairs
    cands = _candidates((gh_t - g_t).abs(), step_quantiles)  # (m, K + 1), ascending, [:, 0] = 0
    k1 = cands.shape[1]

    # Token (t, i) is flagged at candidate k iff cands[i, k] > slack; bucket = first such k
    # (0: flagged at zero margin, K + 1: never).
    slack = torch.minimum(gh_t - lo, hi - gh_t)
    del g_t, gh_t
    bucket = torch.searchsorted(cands, slack, right=True)  # (m, n) in [0, K + 1]
    per_bucket = torch.zeros(2, m, k1 + 1, dtype=wdt, device=dev)
    per_bucket[0].scatter_add_(1, bucket, torch.ones_like(slack))
    per_bucket[1].scatter_add_(1, bucket, out_cost)
    per_bucket = per_bucket.double()
    total = per_bucket[1].sum()
    flags, caught = per_bucket[:, :, :k1].cumsum(dim=2).unbind(0)  # F_k, C_k: (m, K + 1)
    cands = cands.double()

    missed0 = total - caught[:, 0].sum()
    budget = target_missed * total
    if missed0 <= budget:
        return torch.zeros(m, dtype=out_dtype, device=dev)

    if lookahead:
        neuron, target, ratio, removed = _hull_steps(flags, caught)
    else:
        d_f, d_c = flags.diff(dim=1), caught.diff(dim=1)  # (m, K): step k -> k + 1
        ratio = torch.where(d_f > 0, d_c / d_f.clamp(min=1), torch.full_like(d_c, float("inf")))
        keep = (d_c > 0).reshape(-1)
        neuron = torch.arange(m, device=dev).repeat_interleave(k1 - 1)[keep]
        target = torch.arange(1, k1, device=dev).repeat(m)[keep]
        # The running minimum must see the no-gain steps too (they delay what follows them).
        ratio = ratio.cummin(dim=1).values.reshape(-1)[keep]
        removed = d_c.reshape(-1)[keep]
    # Steps are listed by (neuron, step); level = running min of ratio within each neuron.
    level = _segmented_cummin(ratio, neuron)
    order = torch.sort(-level, stable=True).indices  # ties keep (neuron, step) order
    done = removed[order].cumsum(0)
    stop = int(torch.searchsorted(done, (missed0 - budget).reshape(1)).item())  # first index meeting it
    taken = order[: min(stop, order.numel() - 1) + 1]
    reached = torch.zeros(m, dtype=torch.long, device=dev)
    reached.scatter_reduce_(0, neuron[taken], target[taken], reduce="amax")
    return cands.gather(1, reached[:, None]).squeeze(1).to(out_dtype)


def _hull_steps(flags: torch.Tensor, caught: torch.Tensor):
    """Each neuron's greedy-with-lookahead walk over its candidates (the upper concave hull of
    (F_k, C_k) from k = 0): from the current k, go to the k' > k with the best ratio
    (C_k' - C_k) / (F_k' - F_k) > 0, the nearest on ties. Returns, listed by (neuron, step):
    neuron, candidate reached, ratio and cost removed of every step."""
    m, k1 = flags.shape
    dev = flags.device
    cols = torch.arange(k1, device=dev)
    later = cols[None, :] > cols[:, None]  # [k, k']: k' is past k
    # Every neuron's best move from every candidate, in chunks of neurons (m x (K+1)^2 tables).
    best = torch.empty(m, k1, dtype=flags.dtype, device=dev)
    nxt = torch.empty(m, k1, dtype=torch.long, device=dev)
    chunk = max(1, 4_000_000 // (k1 * k1))
    for s in range(0, m, chunk):
        f, c = flags[s:s + chunk], caught[s:s + chunk]
        d_f = f[:, None, :] - f[:, :, None]  # [i, k, k'] = F_k' - F_k
        d_c = c[:, None, :] - c[:, :, None]
        ok = later & (d_c > 0)  # d_c > 0 implies d_f >= 1 (a catch is a flag)
        slope = torch.where(ok, d_c / d_f.clamp(min=1), -1.0)
        best[s:s + chunk], nxt[s:s + chunk] = slope.max(dim=2)  # first (nearest) index on ties
    # Walk from candidate 0 (small (m,) ops: cheap even on a busy machine).
    rows = torch.arange(m, device=dev)  # the neurons still walking
    cur = torch.zeros(m, dtype=torch.long, device=dev)  # their current candidate
    found = []  # per round: (neuron, reached, ratio, removed) of the neurons that moved
    while rows.numel():
        step_best, step_to = best[rows, cur], nxt[rows, cur]
        moved = step_best > 0
        rows, prev, cur, step_best = rows[moved], cur[moved], step_to[moved], step_best[moved]
        found.append((rows, cur, step_best, caught[rows, cur] - caught[rows, prev]))
    neuron, reached, ratio, removed = (torch.cat(parts) for parts in zip(*found))
    by_neuron = torch.sort(neuron, stable=True).indices  # rounds are in step order per neuron
    return neuron[by_neuron], reached[by_neuron], ratio[by_neuron], removed[by_neuron]


def _segmented_cummin(values: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """Running minimum of ``values`` within runs of equal (sorted) ``segment`` ids."""
    if values.numel() == 0:
        return values
    out = values.clone()
    # Few steps per neuron (<= K): a loop over the position within the segment is cheap.
    starts = torch.ones_like(segment, dtype=torch.bool)
    starts[1:] = segment[1:] != segment[:-1]
    pos = torch.arange(values.numel(), device=values.device)
    first = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=0).values
    offset = pos - first
    for j in range(1, int(offset.max().item()) + 1):
        at = (offset == j).nonzero().squeeze(1)
        out[at] = torch.minimum(out[at], out[at - 1])
    return out
