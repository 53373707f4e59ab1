"""The per-FFN plan: one set of decisions for the graph rewrite and the module swap."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import tardis_compiler as tc
from tardis_compiler.compress import model_ffns
from tardis_compiler.passes import ffn_slots
from tardis_compiler.plan import PlanRequest, plan_ffn
from tardis_compiler.runtime.pack import build_pack
from tests.tiny_models import build_tiny, token_batches

QUIET = dict(progress=False, group_size=32)


@pytest.fixture(scope="module")
def llama():
    model = build_tiny("llama")
    batches = token_batches(4)
    profile = tc.calibrate(model, batches, tc.CalibrationConfig(**QUIET))
    found = list(model_ffns(model, batches[0]))
    return model, batches, profile, found


def _weights(found_item):
    match, _, (positions, values) = found_item
    return ffn_slots(match, positions).weights(values)


def test_skip_reasons_and_the_default_guard(llama):
    _, _, profile, found = llama
    match = found[0][0]
    plan = plan_ffn(match, PlanRequest(calibration=profile.config))
    assert plan.rewritten and plan.guard == "int4" and plan.kind == "gated"
    assert plan_ffn(match, PlanRequest(skip=(match.name,))).reason == "excluded by skip"
    config = dataclasses.replace(profile.config, skip=(match.name,))
    assert plan_ffn(match, PlanRequest(calibration=config)).reason == "excluded by the calibration's skip"


def test_shared_weights_stay_dense_on_the_module_door_only(llama):
    match = copy.copy(llama[3][0][0])
    match.name = match.name + "#1"
    assert plan_ffn(match, PlanRequest(door="graph")).rewritten
    plan = plan_ffn(match, PlanRequest(door="module"))
    assert not plan.rewritten and "one pack per module" in plan.reason


def test_a_transposed_gated_weight_stays_dense_on_every_door(llama):
    match = copy.copy(llama[3][0][0])
    match.up = dataclasses.replace(match.up, layout="in_out")
    for door in ("graph", "module"):
        assert "transposed" in plan_ffn(match, PlanRequest(door=door)).reason


def test_calibrated_checks_the_profile(llama):
    _, _, profile, found = llama
    match = found[0][0]
    plan = plan_ffn(match, PlanRequest())
    assert plan.calibrated(None).reason == "not in the profile"
    other = dataclasses.replace(profile.ffns[match.name], d_hidden=7)
    assert "profile has" in plan.calibrated(other).reason
    svd = plan_ffn(match, PlanRequest(guard="svd")).calibrated(profile.ffns[match.name])
    assert not svd.rewritten and "svd" in svd.reason
    with pytest.raises(ValueError, match="no calibration yet"):
        plan.build(_weights(found[0]))


def test_build_is_build_pack_with_the_plans_choices(llama):
    _, _, profile, found = llama
    match = found[0][0]
    ffn = profile.ffns[match.name]
    plan = plan_ffn(match, PlanRequest(bundles="dense", calibration=profile.config)).calibrated(ffn)
    weights = _weights(found[0])
    pack = plan.build(weights)
    want = build_pack("gated", weights, ffn.params("int4"), "int4", ffn.activation, 32, ffn.fold_term, bundles="dense")
    assert pack.layout == want.layout
    for got, expected in zip(pack.tensors(), want.tensors()):
        torch.testing.assert_close(got, expected)


def test_the_report_row_is_the_same_for_both_doors(llama):
    """The backend's explain row and compress_'s entry come from one plan: same guard, same bytes."""
    model, batches, profile, _ = llama
    report = tc.explain(model, batches[0], profile=profile, inner="eager")
    rows = {r.name: r for g in report.graphs for r in g.ffns}
    compressed = tc.compress_(copy.deepcopy(model), profile, batches[0])
    for entry in compressed.ffns:
        row = rows[entry.name]
        assert row.status == "rewritten" and entry.mode == "module"
        assert entry.guard == "int4" and row.guard_kernel.startswith("int4")
        assert entry.read_bytes == pytest.approx(row.bytes_tardis)
        assert entry.measured["flag_rate"] == pytest.approx(row.flag_rate)
