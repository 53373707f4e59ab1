"""Fit FFNs to a bytes budget with the per-neuron policy (DESIGN section 1.4): each FFN kind
prepares its options once (calibrate_gated.py, calibrate_plain.py), then ``allocate`` spends the
budget per layer or across the model.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from .calibrate import FFNRecord
from .calibrate_gated import allocate, budget_of, finish_gated_ffn, prepare_gated_ffn
from .calibrate_plain import finish_plain_ffn, prepare_plain_ffn
from .config import CalibrationConfig
from .profile import FFNProfile


def fit_policy_ffns(records: Iterable[FFNRecord], config: CalibrationConfig, guards: Mapping[str, str],
                    prepared: dict | None = None) -> dict[str, FFNProfile]:
    """Fit every FFN's per-neuron mix within ``config.budget`` (None: 0.5), sharing it as
    ``config.allocation`` says (see ``allocate``). ``guards`` maps an FFN kind ("plain", "gated") to
    the guard its mix is priced for. ``prepared`` (a dict owned by the caller, e.g. a ``Recorder``)
    memoises the per-neuron options, which depend on neither the budget nor the allocation.

    Example:
        >>> # recorder = tc.record(model, batches); fit_policy_ffns(recorder.ffns.values(),
        >>> #     CalibrationConfig(budget=0.5), {"plain": "int8", "gated": "int4"}, recorder.prepared)
    """
    budget = budget_of(config)
    base = dataclasses.replace(config, budget=None, allocation="layer", fold=None, progress=False)
    key_config = tuple(sorted(dataclasses.asdict(base).items()))
    cands = []
    for record in records:
        kind = "gated" if record.gated else "plain"
        key = (record.name, guards[kind], key_config)
        if prepared is None or key not in prepared:
            prepare = prepare_gated_ffn if record.gated else prepare_plain_ffn
            cand = prepare(record, config, guards[kind])
            if prepared is None:
                cands.append(cand)
                continue
            prepared[key] = cand
        cands.append(prepared[key])
    picks = allocate(cands, budget, config.allocation, config.fold)
    return {c.record.name: (finish_gated_ffn if c.record.gated else finish_plain_ffn)(c, variant, choice, budget)
            for c, (variant, choice) in zip(cands, picks)}
