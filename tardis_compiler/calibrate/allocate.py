"""Allocate: fit FFNs to a bytes budget with the per-neuron policy (DESIGN section 1.4).

Each FFN kind prepares its options once (``gated.py``, ``plain.py``: the candidates, which depend
on neither the budget nor how it is shared), then ``allocate`` spends the budget per layer or
across the model (``policy.choose`` / ``policy.choose_across``), and each kind's ``finish_*``
encodes and measures the chosen mix.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from ..config import DEFAULT_BUDGET, CalibrationConfig
from ..profile import FFNProfile
from .gated import GatedCandidates, finish_gated_ffn, prepare_gated_ffn
from .plain import PlainCandidates, finish_plain_ffn, prepare_plain_ffn
from .loss_weights import OutputGradients
from .policy import Choice, NeuronOptions, choose, choose_across

if TYPE_CHECKING:  # the recorder's module imports the fitting steps
    from .record import FFNRecord

#: Each FFN kind's two steps of a per-neuron mix (``runtime/ffn_kind.py``): prepare the options of
#: every neuron (independent of the budget), then finish the profile from the chosen mix.
FIT_STEPS = {"plain": (prepare_plain_ffn, finish_plain_ffn), "gated": (prepare_gated_ffn, finish_gated_ffn)}


def budget_of(config: CalibrationConfig, ffn_name: str = "") -> float:
    """The budget to fit FFN ``ffn_name`` to: its ``config.budgets`` override, else ``config.budget``,
    else ``DEFAULT_BUDGET`` (the gated FFNs of a coverage fit).

    Example:
        >>> budget_of(CalibrationConfig(budget=None)), budget_of(CalibrationConfig(budget=0.3))
        (0.5, 0.3)
    """
    budget = config.budget_for(ffn_name)
    return budget if budget is not None else DEFAULT_BUDGET


def allocate(cands: list[PlainCandidates | GatedCandidates], budget: float | Sequence[float], allocation: str,
             fold: bool | None = None, loss_weights: OutputGradients | None = None,
             resident: float | None = None) -> list[tuple[int, Choice]]:
    """Per FFN, the variant (with or without the folded matrix) and neuron mix to use, within
    ``budget`` (a fraction of dense bytes; one per FFN, or one for all) and, if ``resident`` is
    given, holding at most that fraction of the dense bytes in memory (per FFN for "layer", in
    total otherwise): neurons that can never take the exact path keep no bundle.

    ``"layer"``: each FFN meets the budget on its own, with the variant of least error. ``"model"``:
    the FFNs share it, bytes going where they cut the most *relative* error (each FFN's error over
    its dense output's energy), one Lagrangian over all neurons. On SmolLM2, "layer" measured better
    at every budget (docs/RESULTS.md): output energy is a poor proxy for a layer's effect on the loss.
    ``"loss"``: the FFNs share it, each neuron's error weighted by what the model's loss makes of
    it (``loss_weights.py``: ``w_i^T F w_i`` in place of ``||w_i||^2``), so errors of every layer
    are in one unit and one price per byte spends the budget where the loss rises least.
    ``fold`` restricts the variants: None both, True only with the folded matrix, False only without.

    Example:
        >>> # allocate([prepare_gated_ffn(rec, config, "int8")], 0.5, "layer")
    """
    budgets = [float(budget)] * len(cands) if isinstance(budget, (int, float)) else list(budget)
    allowed = [[i for i, v in enumerate(c.variants) if fold is None or v[0] == fold] for c in cands]
    shared_bytes = sum(c.budget_bytes(b) for c, b in zip(cands, budgets))
    # Held bytes count everything the pack holds (the options' ``held_fixed`` too): the cap is the whole fraction.
    caps = [resident * c.dense_bytes if resident is not None else math.inf for c in cands]
    if allocation == "loss":
        if loss_weights is None:
            raise ValueError('allocation="loss" needs the loss weights of the FFNs (output_gradients): calibrate '
                             "with calibrate() or calibrate_for_budget(), which measure them on the batches")
        layers = [[(_loss_weighted(c.variants[i][1], c, loss_weights), c.variants[i][3]) for i in ids]
                  for c, ids in zip(cands, allowed)]
        picks = choose_across(layers, shared_bytes, resident_bytes=sum(caps))
        return [(ids[k], choice) for ids, (k, choice) in zip(allowed, picks)]
    if allocation == "model":
        layers = [[(c.variants[i][1].scaled(1.0 / max(c.energy, 1e-30)), c.variants[i][3]) for i in ids]
                  for c, ids in zip(cands, allowed)]
        picks = choose_across(layers, shared_bytes, resident_bytes=sum(caps))
        return [(ids[k], choice) for ids, (k, choice) in zip(allowed, picks)]
    picks = []
    for c, ids, b, cap in zip(cands, allowed, budgets, caps):
        choices = {i: choose(c.variants[i][1], c.budget_bytes(b), fixed_bytes=c.variants[i][3], resident_bytes=cap)
                   for i in ids}
        best = min(ids, key=lambda i: (not choices[i].within_budget, choices[i].error))
        picks.append((best, choices[best]))
    return picks


def _loss_weighted(options: NeuronOptions, cand: PlainCandidates | GatedCandidates,
                   loss_weights: OutputGradients) -> NeuronOptions:
    """``options`` with each neuron's error re-weighted from ``||w_i||^2`` to ``w_i^T F w_i``."""
    name = cand.record.name
    if name not in loss_weights.sums:
        raise ValueError(f"no loss gradient reached FFN {name!r}: its output does not affect the loss on the "
                         'calibration batches; use allocation="layer"')
    out_rows = cand.weights[cand.record.kind.out_row]
    ratio = loss_weights.neuron_weights(name, out_rows) / out_rows.double().pow(2).sum(1).clamp(min=1e-30)
    return options.scaled(ratio[:, None])


def fit_policy_ffns(records: Iterable[FFNRecord], config: CalibrationConfig, guards: Mapping[str, str],
                    prepared: dict | None = None, loss_weights: OutputGradients | None = None) -> dict[str, FFNProfile]:
    """Fit every FFN's per-neuron mix within ``config.budget`` (None: ``DEFAULT_BUDGET``), sharing it as
    ``config.allocation`` says (see ``allocate``). ``guards`` maps an FFN kind ("plain", "gated") to
    the guard its mix is priced for. ``prepared`` (a dict owned by the caller, e.g. a ``Recorder``)
    memoises the per-neuron options, which depend on neither the budget nor the allocation.

    Example:
        >>> # recorder = tc.record(model, batches); fit_policy_ffns(recorder.ffns.values(),
        >>> #     CalibrationConfig(budget=0.5), {"plain": "int8", "gated": "int4"}, recorder.prepared)
    """
    base = dataclasses.replace(config, budget=None, budgets={}, allocation="layer", fold=None, progress=False,
                               resident=None)
    key_config = json.dumps(dataclasses.asdict(base), sort_keys=True)
    cands = []
    for record in records:
        kind = record.kind.name
        key = (record.name, guards[kind], key_config)
        if prepared is None or key not in prepared:
            cand = FIT_STEPS[kind][0](record, config, guards[kind])
            if prepared is None:
                cands.append(cand)
                continue
            prepared[key] = cand
        cands.append(prepared[key])
    budgets = [budget_of(config, c.record.name) for c in cands]
    return {c.record.name: f for c, f in zip(cands, _fit_within(cands, budgets, config, loss_weights))}


#: Rounds of re-fitting where the bytes measured on the held-out calibration tokens exceed the
#: budget (the mix is chosen on the fitting tokens, whose flag rates run slightly lower).
BUDGET_ROUNDS = 2
#: Held-out overshoot tolerated (relative), and the extra margin a re-chosen target gets.
BUDGET_TOLERANCE = 1e-3


def _fit_within(cands: list[PlainCandidates | GatedCandidates], budgets: list[float], config: CalibrationConfig,
                loss_weights: OutputGradients | None) -> list[FFNProfile]:
    """Choose, finish and measure every FFN's mix; where the held-out bytes overshoot, shrink the
    target by the overshoot and choose again (per FFN for "layer", all together when shared)."""
    targets = list(budgets)
    redo = list(range(len(cands)))
    ffns: list[FFNProfile | None] = [None] * len(cands)
    for round_ in range(BUDGET_ROUNDS + 1):
        if config.allocation == "layer":
            picks = dict(zip(redo, allocate([cands[i] for i in redo], [targets[i] for i in redo], "layer",
                                            config.fold, resident=config.resident)))
        else:
            picks = dict(enumerate(allocate(cands, targets, config.allocation, config.fold, loss_weights,
                                            config.resident)))
        for i in redo:
            c, (variant, choice) = cands[i], picks[i]
            ffns[i] = FIT_STEPS[c.record.kind.name][1](c, variant, choice, budgets[i])
            ffns[i].stats["policy"]["target_fraction"] = targets[i]
        if round_ == BUDGET_ROUNDS:
            break
        fractions = [f.stats["bytes_fraction"] for f in ffns]
        if config.allocation == "layer":
            redo = [i for i, f in enumerate(fractions) if f > budgets[i] * (1 + BUDGET_TOLERANCE)]
            for i in redo:
                targets[i] *= budgets[i] / fractions[i] * (1 - BUDGET_TOLERANCE)
        else:
            budget = budgets[0]  # one for all: per-FFN budgets need allocation="layer" (config.py)
            read = sum(f * c.dense_bytes for f, c in zip(fractions, cands)) / sum(c.dense_bytes for c in cands)
            redo = list(range(len(cands))) if read > budget * (1 + BUDGET_TOLERANCE) else []
            targets = [t * budget / read * (1 - BUDGET_TOLERANCE) for t in targets] if redo else targets
        if not redo:
            break
    return ffns


def fit_plain_ffn(record: FFNRecord, config: CalibrationConfig, guard: str) -> FFNProfile:
    """Fit one plain FFN's per-neuron policy for ``guard`` within ``config.budget`` of its dense bytes
    read per token, and measure it on held-out tokens.

    Example:
        >>> import torch, tardis_compiler as tc
        >>> from tardis_compiler.calibrate.record import FFNRecord
        >>> _ = torch.manual_seed(0); d, m = 32, 128
        >>> w = {"w1_rows": torch.randn(m, d) / 4, "b1": None, "w2_rows": torch.randn(m, d) / 8, "b2": None}
        >>> rec = FFNRecord("mlp", "linear-act-linear", "gelu", w, max_tokens=2048, seed=0)
        >>> rec.add(torch.randn(2048, d))
        >>> ffn = fit_plain_ffn(rec, tc.CalibrationConfig(budget=0.5, progress=False), "int8")
        >>> ffn.stats["bytes_fraction"] <= 0.5 + 0.05
        True
    """
    budget = budget_of(config, record.name)
    cand = prepare_plain_ffn(record, config, guard)
    (variant, choice), = allocate([cand], budget, "layer", config.fold)
    return finish_plain_ffn(cand, variant, choice, budget)


def fit_gated_ffn(record: FFNRecord, config: CalibrationConfig, guard: str) -> FFNProfile:
    """Fit one gated FFN's constants, ranges, guard margins and per-neuron policy for ``guard``
    within ``config.budget`` of its dense bytes read per token, and measure it on held-out tokens.

    Example:
        >>> import torch, tardis_compiler as tc
        >>> from tardis_compiler.calibrate.record import FFNRecord
        >>> _ = torch.manual_seed(0); d, m = 32, 64
        >>> w = {"wg_rows": torch.randn(m, d) / 4, "bg": None, "wu_rows": torch.randn(m, d) / 4, "bu": None,
        ...      "wd_rows": torch.randn(m, d) / 8, "bd": None}
        >>> rec = FFNRecord("mlp", "gated", "silu", w, max_tokens=2048, seed=0); rec.add(torch.randn(2048, d))
        >>> ffn = fit_gated_ffn(rec, tc.CalibrationConfig(budget=0.5, progress=False), "int8")
        >>> ffn.kind, ffn.stats["bytes_fraction"] <= 0.5 + 0.05
        ('gated', True)
    """
    budget = budget_of(config, record.name)
    cand = prepare_gated_ffn(record, config, guard)
    (variant, choice), = allocate([cand], budget, "layer", config.fold)
    return finish_gated_ffn(cand, variant, choice, budget)
