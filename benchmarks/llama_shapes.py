"""Llama-3.2-1B and Llama-3-8B FFN shapes for ``ffn_decode.py`` (a simulation, labelled as such).

SmolLM2's FFNs (576 -> 1536, 2.7 MB in bf16) sit in a 32 MiB L3; a 1B model's (2048 -> 8192, 100 MB)
and an 8B model's (4096 -> 14336, 352 MB) do not, so that is where reading fewer bytes should pay
most. No such model installs offline here, so these shapes carry random weights (N(0, 1/fan_in))
and the per-neuron calibration of SmolLM2 at the same budget, resampled:

1. SmolLM2 is calibrated (cached) at the budget; each of its 30 x 1536 neurons gives a descriptor:
   its option (folded, guarded, always exact), its folded constant, and, if guarded, how often the
   guard flagged it on held-out text (``ffn_decode``'s recorded rows of that layer).
2. Each synthetic neuron copies a descriptor drawn at random (seeded). A guarded neuron's band is
   placed at the quantiles of its own guard's predictions on 256 inputs x ~ N(0, 1) that leave
   out the drawn flag rate; the timed inputs are fresh draws of the same x, so the flag rate the
   benchmark measures (its "flag rate" column) is what the calibration saw on text, not chosen.

    python benchmarks/ffn_decode.py --shapes llama-1b llama-8b --dtypes bfloat16 --weights dense int8
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ffn_decode import ROWS, Setup, smollm2

import tardis_compiler as tc
from tardis_compiler.runtime.pack import build_pack, neuron_classes
from tardis_compiler.runtime.torch_path import ffn_torch, guard_predictions

#: name -> (title, d_model, d_ffn, copies of the layer timed in turn).
SHAPES = {"llama-1b": ("Llama-3.2-1B", 2048, 8192, 2), "llama-8b": ("Llama-3-8B", 4096, 14336, 1)}
INF = float("inf")
FOLDED, GUARDED, ALWAYS = 0, 1, 2


class GatedFFN(torch.nn.Module):
    """down(silu(gate x) * up x): a Llama MLP."""

    def __init__(self, d: int, m: int, generator: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = torch.nn.Linear(d, m, bias=False, dtype=dtype)
        self.up_proj = torch.nn.Linear(d, m, bias=False, dtype=dtype)
        self.down_proj = torch.nn.Linear(m, d, bias=False, dtype=dtype)
        with torch.no_grad():
            for lin, fan_in in ((self.gate_proj, d), (self.up_proj, d), (self.down_proj, m)):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=generator) / fan_in ** 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@dataclasses.dataclass
class Descriptors:
    """SmolLM2's neurons at one budget: option, folded constant, flag rate (guarded only)."""

    option: torch.Tensor
    constant: torch.Tensor
    flag_rate: torch.Tensor
    bundles: str
    weights: str | None


@dataclasses.dataclass
class SyntheticFFN:
    """What ``ffn_decode.bench`` reads of a calibrated FFN: params, encodings, width."""

    rows: torch.Tensor
    bundles: str
    weights: str | None
    d_hidden: int

    def params(self, guard: str) -> torch.Tensor:
        return self.rows


@dataclasses.dataclass
class SyntheticProfile:
    ffns: dict[str, SyntheticFFN]


def descriptors(source: Setup, guard: str, group: int) -> dict[str, Descriptors]:
    """Per tardis row of ``source`` (SmolLM2), its neurons' descriptors."""
    out = {}
    for label, (profile, names) in source.profiles.items():
        options, constants, rates = [], [], []
        for i, name in enumerate(names):
            ffn = profile.ffns[name]
            params = ffn.params(guard)
            guarded, always = neuron_classes(params, guard, ffn.d_hidden)
            option = torch.full((ffn.d_hidden,), FOLDED)
            option[guarded], option[always] = GUARDED, ALWAYS
            pack = build_pack(source.kind, source.weights[i], params, guard, source.activation, group,
                              bundles=ffn.bundles, weights_encoding=ffn.weights)
            _, flags = ffn_torch(source.inputs[i], *pack.tensors(), pack.layout)
            rate = torch.zeros(ffn.d_hidden)
            if flags is not None and guarded.numel():
                rate[guarded] = flags[:, :guarded.numel()].float().mean(0)
            options.append(option), constants.append(params[1, :ffn.d_hidden].float()), rates.append(rate)
        first = profile.ffns[names[0]]
        out[label] = Descriptors(torch.cat(options), torch.cat(constants), torch.cat(rates), first.bundles,
                                 first.weights)
    return out


def _params(desc: Descriptors, draw: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    """The (6, m) rows of the synthetic neurons ``draw`` (indices into ``desc``); ``predictions``
    (samples, m): each neuron's guard predictions on the band-placing inputs."""
    option, rate = desc.option[draw], desc.flag_rate[draw]
    m = draw.numel()
    rows = torch.zeros(6, m)
    rows[1] = desc.constant[draw]
    rows[2:6] = torch.tensor([[-INF], [INF], [-INF], [INF]])
    guarded = option == GUARDED
    q = torch.stack([rate / 2, 1 - rate / 2])  # the band leaves out rate of the predictions
    sorted_z = predictions.sort(0).values
    idx = (q * (sorted_z.shape[0] - 1)).round().long()
    lo = sorted_z.gather(0, idx[:1]).squeeze(0)
    hi = sorted_z.gather(0, idx[1:]).squeeze(0)
    span = sorted_z[-1] - sorted_z[0]
    lo = torch.where(rate == 0, sorted_z[0] - span, lo)  # never flagged on text: beyond every sample
    hi = torch.where(rate == 0, sorted_z[-1] + span, hi)
    for row, band in ((2, lo), (4, lo), (3, hi), (5, hi)):
        rows[row, guarded] = band[guarded]
    always = option == ALWAYS
    rows[2:6, always] = torch.tensor([[INF], [-INF], [INF], [-INF]])
    return rows


def llama(shape: str, dtype: torch.dtype, budgets, weights=(None,)) -> Setup:
    """The Setup of ``shape`` ("llama-1b" / "llama-8b"): random layers, SmolLM2's calibration."""
    title, d, m, copies = SHAPES[shape]
    guard = tc.config.DEFAULT_GUARDS["gated"]
    group = tc.CalibrationConfig().group_size
    source = smollm2(dtype, budgets, weights)
    described = descriptors(source, guard, group)
    del source
    g = torch.Generator().manual_seed(0)
    modules = [GatedFFN(d, m, g, dtype).eval() for _ in range(copies)]
    w = [{"wg_rows": mod.gate_proj.weight, "bg": None, "wu_rows": mod.up_proj.weight, "bu": None,
          "wd_rows": mod.down_proj.weight.t(), "bd": None} for mod in modules]
    placing = torch.randn(256, d, generator=g).to(dtype)
    inputs = [torch.randn(ROWS, d, generator=g).to(dtype) for _ in modules]
    names = [f"layer{i}" for i in range(copies)]
    profiles = {}
    for label, desc in described.items():
        draw = torch.randint(0, desc.option.numel(), (m,), generator=g)
        ffns = {}
        for name, weights_i in zip(names, w):
            # Provisional bands (every drawn guarded neuron guarded) give the guard's predictions.
            probe = _params(desc, draw, torch.zeros(2, m))
            pack = build_pack("gated", weights_i, probe, guard, "silu", group, bundles=desc.bundles,
                              weights_encoding=desc.weights)
            guarded, _ = neuron_classes(probe, guard, m)
            z = torch.zeros(placing.shape[0], m)
            z[:, guarded] = guard_predictions(pack.layout, placing, *pack.tensors()).float()
            ffns[name] = SyntheticFFN(_params(desc, draw, z), desc.bundles, desc.weights, m)
        profiles[label] = (SyntheticProfile(ffns), names)
    return Setup(f"{title} FFN shape ({d} -> {m} gated, {copies} random layer(s); SmolLM2's per-neuron "
                 f"calibration resampled: a simulation)", "gated", "silu", modules, w, inputs, profiles)
