"""Random FFNs and calibrations for the runtime tests: any shape, kind, guard, dtype and mix."""
from __future__ import annotations

import dataclasses

import torch

from tardis_compiler.runtime.pack import FFNPack, build_pack, neuron_classes
from tardis_compiler.runtime.torch_path import guard_predictions

INF = float("inf")


@dataclasses.dataclass
class Case:
    kind: str
    d_in: int
    d_out: int
    m: int
    guard: str = "int8"
    activation: str = "silu"
    dtype: torch.dtype = torch.float32
    bias: bool = True
    frac_guarded: float = 0.5
    frac_always: float = 0.2
    lines: bool = True  # nonzero lines/constants (a folded matrix); False: contextual sparsity
    group: int = 16
    rank: int = 4
    seed: int = 0
    bundles: str = "dense"  # "int8": the guarded neurons' bundles as int8 codes
    weights_encoding: str = "dense"  # "int8" / "int4": a quantized pack (Wf and every bundle quantized)

    def __post_init__(self) -> None:
        if self.weights_encoding != "dense":
            self.bundles = "int8"  # a quantized pack's bundles are all quantized (int8 asks for that)

    @property
    def tag(self) -> str:
        """A short test id: kind, guard, bundles, quantized weights and dtype."""
        q = {"dense": "", "int8": "-q8", "int4": "-q4"}[self.weights_encoding]
        return self.kind + self.guard + self.bundles + q + str(self.dtype)[-4:]

    def weights(self) -> dict[str, torch.Tensor | None]:
        g = torch.Generator().manual_seed(self.seed)
        r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(self.dtype)  # noqa: E731
        b = lambda n: (torch.randn(n, generator=g) * 0.3).to(self.dtype) if self.bias else None  # noqa: E731
        if self.kind == "gated":
            return {"wg_rows": r(self.m, self.d_in), "bg": b(self.m), "wu_rows": r(self.m, self.d_in), "bu": b(self.m),
                    "wd_rows": r(self.d_out, self.m).t(), "bd": b(self.d_out)}
        return {"w1_rows": r(self.m, self.d_in), "b1": b(self.m), "w2_rows": r(self.d_out, self.m).t(), "b2": b(self.d_out)}

    def inputs(self, tokens: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(tokens, self.d_in, generator=g).to(self.dtype)


def case_params(case: Case, weights: dict, x: torch.Tensor) -> torch.Tensor:
    """Calibration rows for ``case``: guarded neurons get bands at midpoints between the guard's
    predictions on ``x`` (so no prediction sits on a band edge, where two float32 summation orders
    could flag differently), always-exact ones an empty band, the rest an unbounded one."""
    g = torch.Generator().manual_seed(case.seed + 2)
    m = case.m
    rows = torch.zeros(6, m)
    if case.lines:
        rows[0] = torch.rand(m, generator=g) if case.kind == "plain" else 0.0
        rows[1] = torch.randn(m, generator=g) * 0.2
    kinds = torch.rand(m, generator=g)
    always = kinds < case.frac_always
    guarded = (kinds >= case.frac_always) & (kinds < case.frac_always + case.frac_guarded)
    rows[2:6, ~guarded] = torch.tensor([[-INF], [INF], [-INF], [INF]])
    rows[2:6, always] = torch.tensor([[INF], [-INF], [INF], [-INF]])
    predictor = None
    if case.guard == "svd":
        predictor = torch.randn(case.rank, m + case.d_in, generator=g) / case.d_in ** 0.5
    probe = _stack(rows, predictor)
    cols = guarded.nonzero().squeeze(1)
    probe[2:4, cols] = 0.0  # guarded, bands to be placed
    probe[4, cols], probe[5, cols] = -1.0, 1.0
    z_hat = guard_predictions_with_bias(case, weights, probe, x)  # (T, m) with the bias
    for i in guarded.nonzero().squeeze(1).tolist():
        values = z_hat[:, i].sort().values
        lo_rank, hi_rank = sorted(torch.randint(0, len(values) + 1, (2,), generator=g).tolist())
        rows[4, i] = _between(values, lo_rank)
        rows[5, i] = _between(values, hi_rank)
    rows[2], rows[3] = torch.where(guarded, rows[4], rows[2]), torch.where(guarded, rows[5], rows[3])
    return _stack(rows, predictor)


def _stack(rows: torch.Tensor, predictor: torch.Tensor | None) -> torch.Tensor:
    """The params tensor: the (6, m) rows, and for svd the factors below (as ``FFNProfile.params``)."""
    if predictor is None:
        return rows.clone()
    pad = rows.new_zeros(6, predictor.shape[1] - rows.shape[1])
    return torch.cat([torch.cat([rows, pad], dim=1), predictor])


def _between(sorted_values: torch.Tensor, rank: int) -> float:
    if rank == 0:
        return float(sorted_values[0]) - 1.0
    if rank == len(sorted_values):
        return float(sorted_values[-1]) + 1.0
    return float(sorted_values[rank - 1] + sorted_values[rank]) / 2


def guard_predictions_with_bias(case: Case, weights: dict, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The guard's predictions of every neuron's first pre-activation, bias included."""
    guard = case.guard if case.guard != "all" else "exact"  # "all" needs no bands: any prediction will do
    quantized = case.weights_encoding if case.guard != "all" else "dense"  # the guard codes the pack will hold
    pack = build_pack(case.kind, weights, params, guard, case.activation, case.group,
                      bundles="dense" if quantized == "dense" else "int8", weights_encoding=quantized)
    guarded, _ = neuron_classes(params, guard, case.m)
    out = torch.zeros(x.shape[0], case.m)
    out[:, guarded] = guard_predictions(pack.layout, x, *pack.tensors())
    bias = weights["bg" if case.kind == "gated" else "b1"]
    return out + (bias.float() if bias is not None else 0.0)


def make(case: Case, tokens: int) -> tuple[dict, torch.Tensor, torch.Tensor, FFNPack]:
    """(weights, params, x, pack) of a case."""
    weights = case.weights()
    x = case.inputs(tokens)
    params = case_params(case, weights, x)
    return weights, params, x, build_pack(case.kind, weights, params, case.guard, case.activation, case.group,
                                          bundles=case.bundles, weights_encoding=case.weights_encoding)
