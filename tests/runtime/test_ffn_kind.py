"""FFN kinds: each kind's fold plus its exact correction is its dense FFN, whatever the lines."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tardis_compiler.runtime.ffn_kind import GATED, KINDS, PLAIN, ffn_kind
from tardis_compiler.runtime.pack import fold_ffn


def _weights(kind, m=12, d_in=8, d_out=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = {}
    for i, (row, bias) in enumerate(zip(kind.rows, kind.biases)):
        w[row] = torch.randn(m, d_out if i == kind.n_inputs else d_in, generator=g, dtype=torch.float64)
        w[bias] = torch.randn(d_out if i == kind.n_inputs else m, generator=g, dtype=torch.float64)
    return w


@pytest.mark.parametrize("kind", list(KINDS.values()), ids=lambda k: k.name)
def test_fold_plus_correction_is_the_dense_ffn(kind):
    w = _weights(kind)
    x = torch.randn(5, 8, dtype=torch.float64)
    slope, intercept = torch.rand(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    wf, bf = fold_ffn(*kind.fold_lines(w, slope, intercept))
    z = F.linear(x, w[kind.first_row], w[kind.first_bias])
    up = F.linear(x, w[kind.up_row], w[kind.up_bias]) if kind.up_row else None
    delta = kind.exact_delta(torch.tanh, z, up, slope if kind.folds_slope else 0 * slope, intercept)
    got = F.linear(x, wf, bf) + delta @ w[kind.out_row]
    torch.testing.assert_close(got, kind.dense(w, torch.tanh, x))


def test_names_and_sizes():
    assert ffn_kind("plain") is PLAIN and ffn_kind(GATED) is GATED
    assert PLAIN.slots == ("w1", "b1", "w2", "b2") and GATED.up_row == "wu_rows" and PLAIN.up_row is None
    assert (PLAIN.bundle_row(384, 384), GATED.bundle_row(576, 576)) == (768, 1728)
    with pytest.raises(ValueError, match="unknown FFN kind"):
        ffn_kind("moe")
