"""pruning.py: Wanda/RIA keep the right weights, meet the budget, and copy the model."""
import pytest
import torch

from tardis_compiler.eval.calibration_stats import ffn_input_stats
from tardis_compiler.eval.ffn import find_ffn_linears
from tardis_compiler.eval.pruning import keep_top_per_row, ria, ria_scores, wanda, wanda_scores

from tests.eval.helpers import assert_unchanged, state_snapshot


def test_wanda_keeps_large_weight_times_activation_not_large_weight():
    # Row 0: |W| alone would keep columns 0 and 1; the activation norms make column 2 win over 1.
    weight = torch.tensor([[4.0, 3.0, 1.0, 0.5],
                           [0.1, 0.2, 0.3, 0.4]])
    norms = torch.tensor([1.0, 0.1, 10.0, 1.0])
    mask = keep_top_per_row(wanda_scores(weight, norms), keep=2)
    assert mask.tolist() == [[True, False, True, False],
                             [False, False, True, True]]


def test_ria_uses_relative_importance_and_sqrt_activation():
    weight = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    scores = ria_scores(weight, torch.tensor([4.0, 1.0]))
    expected = torch.tensor([[2 / 3 + 2 / 3, 1 / 3 + 1 / 2],
                             [1 / 2 + 1 / 3, 1 / 2 + 1 / 2]]) * torch.tensor([2.0, 1.0])
    assert torch.allclose(scores, expected)


@pytest.mark.parametrize("method", [wanda, ria])
@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7, 1.0])
def test_density_meets_the_budget_in_bitmask_format(llama, batches, method, budget):
    prepared = method(llama, batches, budget)
    # Rounding keep = density * in_features per row moves the fraction by < 1/in_features.
    assert prepared.ffn_bytes.read_fraction == pytest.approx(budget, abs=1 / 32)
    assert prepared.ffn_bytes.resident == prepared.ffn_bytes.read_per_token
    expected_density = 1.0 if budget == 1.0 else budget - 1 / 32
    for ffn in find_ffn_linears(prepared.model):
        kept_per_row = (ffn.module.weight != 0).sum(1)
        assert (kept_per_row == round(expected_density * ffn.module.in_features)).all()


@pytest.mark.parametrize("method", [wanda, ria])
def test_the_model_passed_in_is_not_modified(llama, batches, method):
    snapshot = state_snapshot(llama)
    prepared = method(llama, batches, 0.5)
    assert prepared.model is not llama
    assert_unchanged(llama, snapshot)


def test_wanda_mask_on_a_real_model_is_the_per_row_top_k(llama, batches):
    prepared = wanda(llama, batches, 0.5)
    stats = ffn_input_stats(llama, batches)
    name = "model.layers.1.mlp.down_proj"
    dense_weight = llama.get_submodule(name).weight
    keep = round((0.5 - 1 / 32) * dense_weight.shape[1])
    expected = keep_top_per_row(dense_weight.abs() * stats[name].feature_norm.float(), keep)
    pruned = prepared.model.get_submodule(name).weight
    assert torch.equal(pruned != 0, expected)
    assert torch.equal(pruned[expected], dense_weight[expected])


def test_bert_is_pruned_in_its_ffn_only(bert, batches):
    prepared = wanda(bert, batches, 0.3)
    attention = prepared.model.encoder.layer[0].attention.output.dense.weight
    assert (attention != 0).all()
    assert prepared.details["density"] == pytest.approx(0.3 - 1 / 32, abs=1 / 32)
