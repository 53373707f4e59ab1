"""The whitened truncated-SVD guard (SVDP) and its greedy per-neuron margins."""
import doctest
import heapq

import pytest
import torch

import tardis_compiler.runtime.svd_predictor as svd_module
from tardis_compiler.runtime.svd_predictor import SVDPredictor, candidate_margins, greedy_margins


def _anisotropic_inputs(n, d, gen, decay=3.0):
    """Inputs with a strongly anisotropic covariance in a random basis (eigen-scales 1 .. 10^-decay)."""
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    scales = torch.logspace(0, -decay, d, dtype=torch.float64)
    return ((torch.randn(n, d, generator=gen, dtype=torch.float64) * scales) @ basis.T).float()


def test_docstring_examples_run():
    # tests/test_docstrings.py does not list this module (yet); run its examples here.
    result = doctest.testmod(svd_module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("m,d", [(48, 32), (32, 48)])
def test_full_rank_reproduces_wx(m, d):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(m, d, generator=gen)
    x = _anisotropic_inputs(300, d, gen, decay=2.0)
    pred = SVDPredictor.build(w, x, rank=min(m, d))
    x_new = torch.randn(7, d, generator=gen)
    torch.testing.assert_close(pred.predict(x_new), x_new @ w.T, atol=1e-4, rtol=1e-4)
    assert pred.predict(x_new).dtype == torch.float32


def test_storage_dtype_follows_weights_and_is_contiguous():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 24, generator=gen).to(torch.bfloat16)
    pred = SVDPredictor.build(w, torch.randn(100, 24, generator=gen), rank=8)
    assert pred.P.dtype == pred.Q.dtype == torch.bfloat16
    assert pred.P.is_contiguous() and pred.Q.is_contiguous()
    assert pred.predict(torch.randn(3, 24, generator=gen)).dtype == torch.float32


def test_whitening_beats_plain_truncated_svd_on_held_out_inputs():
    gen = torch.Generator().manual_seed(2)
    m, d, rank = 96, 64, 16
    w = torch.randn(m, d, generator=gen)
    x_all = _anisotropic_inputs(2500, d, gen)  # one draw: fit and held-out share the covariance
    x_fit, x_held = x_all[:2000], x_all[2000:]
    whitened = SVDPredictor.build(w, x_fit, rank=rank)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    plain = ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()
    z = x_held @ w.T
    err_whitened = (whitened.predict(x_held) - z).norm() / z.norm()
    err_plain = (x_held @ plain.T - z).norm() / z.norm()
    assert err_whitened < 0.5 * err_plain, (err_whitened, err_plain)


def test_n_smaller_than_d_is_fine_with_damping():
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(32, 64, generator=gen)
    x = torch.randn(10, 64, generator=gen)
    pred = SVDPredictor.build(w, x, rank=8)
    assert torch.isfinite(pred.predict(x)).all()
    with pytest.raises(ValueError, match="positive definite"):
        SVDPredictor.build(w, x, rank=8, damping=0.0)


def test_bytes_accounting():
    gen = torch.Generator().manual_seed(5)
    m, d, r = 96, 40, 12
    pred = SVDPredictor.build(torch.randn(m, d, generator=gen), torch.randn(200, d, generator=gen), rank=r)
    assert pred.kernel == "svd-r12" and pred.rank == r
    assert pred.bytes_read() == (r * d + m * r) * 4
    assert pred.bytes_read(2) == (r * d + m * r) * 2
    assert pred.resident_bytes() == (r * d + m * r) * 4
    half = SVDPredictor.build(torch.randn(m, d, generator=gen).half(), torch.randn(200, d, generator=gen), rank=r)
    assert half.bytes_read() == half.resident_bytes() == (r * d + m * r) * 2


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank"),
    ({"rank": 33}, "rank"),
    ({"rank": 2.5}, "rank"),
    ({"rank": 4, "x": torch.zeros(0, 32)}, "no calibration tokens"),
    ({"rank": 4, "x": torch.zeros(10, 31)}, r"x must be \(tokens, d=32\)"),
    ({"rank": 4, "w_rows": torch.zeros(48, 32, 1)}, "w_rows must be"),
    ({"rank": 4, "damping": -1.0}, "damping"),
    ({"rank": 4, "x": torch.full((10, 32), float("nan"))}, "finite"),
])
def test_bad_build_inputs_raise(kwargs, match):
    args = {"w_rows": torch.randn(48, 32), "x": torch.randn(50, 32), **kwargs}
    with pytest.raises(ValueError, match=match):
        SVDPredictor.build(**args)


def test_predict_checks_width():
    pred = SVDPredictor.build(torch.randn(16, 8), torch.randn(20, 8), rank=2)
    with pytest.raises(ValueError, match="expected inputs"):
        pred.predict(torch.randn(3, 9))


# ---- greedy margins

def _problem(n, m, seed, noise=0.3):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, m, generator=gen) * torch.linspace(0.5, 2.0, m)
    g_hat = g + noise * torch.randn(n, m, generator=gen) * torch.linspace(1.5, 0.5, m)
    lower = torch.quantile(g, 0.15, dim=0)
    upper = torch.quantile(g, 0.9, dim=0)
    cost = torch.nn.functional.silu(g) ** 2 * torch.rand(m, generator=gen) * 5
    return g, g_hat, lower, upper, cost


def _missed_fraction(g, g_hat, lower, upper, cost, mu):
    flagged = (g_hat < lower + mu) | (g_hat > upper - mu)
    outside = (g < lower) | (g > upper)
    return ((cost * (outside & ~flagged)).sum() / (cost * outside).sum()).item(), flagged.float().mean().item()


@pytest.mark.parametrize("target", [0.0, 0.01, 0.05])
def test_greedy_meets_target_on_fit_and_nearly_on_held_out(target):
    g, g_hat, lower, upper, cost = _problem(8000, 24, seed=0)
    fit, held = slice(0, 6000), slice(6000, None)
    mu = greedy_margins(g[fit], g_hat[fit], lower, upper, cost[fit], target)
    assert mu.shape == (24,) and (mu >= 0).all()
    missed_fit, _ = _missed_fraction(g[fit], g_hat[fit], lower, upper, cost[fit], mu)
    assert missed_fit <= target + 1e-9
    missed_held, _ = _missed_fraction(g[held], g_hat[held], lower, upper, cost[held], mu)
    assert missed_held <= max(2 * target, 0.005)


def test_greedy_is_zero_for_an_exact_predictor_and_when_nothing_is_out_of_range():
    g, _, lower, upper, cost = _problem(1000, 10, seed=1)
    assert (greedy_margins(g, g, lower, upper, cost, 0.01) == 0).all()
    wide_lo, wide_hi = g.amin(0) - 1, g.amax(0) + 1
    g_hat = g + 0.5 * torch.randn_like(g)
    assert (greedy_margins(g, g_hat, wide_lo, wide_hi, cost, 0.01) == 0).all()
    assert (greedy_margins(g, g_hat, lower, upper, cost, 1.0) == 0).all()


def test_greedy_flags_less_than_a_uniform_scale_at_the_same_missed_cost():
    from tardis_compiler.calibrate.margins import recall_margins

    g, g_hat, lower, upper, cost = _problem(6000, 32, seed=2)
    mu = greedy_margins(g, g_hat, lower, upper, cost, 0.01)
    missed, flag_rate = _missed_fraction(g, g_hat, lower, upper, cost, mu)
    # The uniform-scale margins of recall_margins, pushed until they miss no more cost:
    lo, hi = 0.9, 0.99999
    for _ in range(30):
        mid = (lo + hi) / 2
        uni = recall_margins(g, g_hat, lower, upper, mid)
        lo, hi = (lo, mid) if _missed_fraction(g, g_hat, lower, upper, cost, uni)[0] <= missed else (mid, hi)
    uni_missed, uni_flag_rate = _missed_fraction(g, g_hat, lower, upper, cost, recall_margins(g, g_hat, lower, upper, hi))
    assert uni_missed <= missed + 1e-6
    assert flag_rate < uni_flag_rate


def _greedy_reference(g, g_hat, lower, upper, cost, target, quantiles, lookahead):
    """The greedy spelled out with a priority queue (ties: larger ratio first, then lower neuron)."""
    cands = candidate_margins(g, g_hat, quantiles)
    m, k1 = cands.shape
    outside = (g < lower) | (g > upper)
    total = (cost.double() * outside).sum().item()

    def stats(i, k):
        mu = cands[i, k].item()
        f = (g_hat[:, i].double() < lower[i].double() + mu) | (g_hat[:, i].double() > upper[i].double() - mu)
        return f.sum().item(), (cost[:, i].double() * (outside[:, i] & f)).sum().item()

    table = [[stats(i, k) for k in range(k1)] for i in range(m)]
    missed = total - sum(table[i][0][1] for i in range(m))
    steps = [0] * m
    last_gain = [0] * m  # the margin is where the last step that caught something ended
    heap = []

    def push(i):
        f0, c0 = table[i][steps[i]]
        options = []
        for k in range(steps[i] + 1, k1 if lookahead else min(k1, steps[i] + 2)):
            df, dc = table[i][k][0] - f0, table[i][k][1] - c0
            options.append((float("inf") if df == 0 else dc / df, -k))
        if options:
            ratio, neg_k = max(options)  # best ratio, nearest candidate on ties
            if lookahead and ratio <= 0:
                return
            heapq.heappush(heap, (-ratio, i, -neg_k))

    for i in range(m):
        push(i)
    while missed > target * total and heap:
        _, i, k = heapq.heappop(heap)
        gain = table[i][k][1] - table[i][steps[i]][1]
        missed -= gain
        steps[i] = k
        last_gain[i] = k if gain > 0 else last_gain[i]
        push(i)
    return torch.tensor([cands[i, last_gain[i]].item() for i in range(m)], dtype=torch.float64)


@pytest.mark.parametrize("lookahead", [True, False])
@pytest.mark.parametrize("seed,target", [(3, 0.01), (4, 0.05), (5, 0.2)])
def test_greedy_matches_a_priority_queue_reference(seed, target, lookahead):
    quantiles = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
    g, g_hat, lower, upper, cost = _problem(600, 12, seed=seed, noise=0.5)
    g, g_hat, lower, upper, cost = (t.double() for t in (g, g_hat, lower, upper, cost))
    got = greedy_margins(g, g_hat, lower, upper, cost, target, step_quantiles=quantiles, lookahead=lookahead)
    want = _greedy_reference(g, g_hat, lower, upper, cost, target, quantiles, lookahead)
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_greedy_bad_inputs_raise():
    g, g_hat, lower, upper, cost = _problem(100, 5, seed=6)
    with pytest.raises(ValueError, match="shape"):
        greedy_margins(g, g_hat[:, :4], lower, upper, cost, 0.01)
    with pytest.raises(ValueError, match="lower and upper"):
        greedy_margins(g, g_hat, lower[:4], upper, cost, 0.01)
    with pytest.raises(ValueError, match="target_missed"):
        greedy_margins(g, g_hat, lower, upper, cost, 1.5)
    with pytest.raises(ValueError, match="cost"):
        greedy_margins(g, g_hat, lower, upper, -cost - 1, 0.01)
    with pytest.raises(ValueError, match="step_quantiles"):
        greedy_margins(g, g_hat, lower, upper, cost, 0.01, step_quantiles=(0.5, 1.5))
