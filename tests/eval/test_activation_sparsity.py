"""activation_sparsity.py: thresholds hit the target sparsity and the meter counts columns read."""
import pytest
import torch

from tardis_compiler.eval.activation_sparsity import ThresholdSparseLinear, teal

from tests.eval.helpers import assert_unchanged, state_snapshot


def test_threshold_linear_zeroes_small_inputs_and_counts_columns():
    linear = torch.nn.Linear(4, 3)
    layer = ThresholdSparseLinear(linear, threshold=0.5)
    x = torch.tensor([[0.1, -2.0, 0.4, 1.0], [0.6, 0.0, -0.7, 0.2]])
    expected = linear(x * torch.tensor([[0, 1, 0, 1], [1, 0, 1, 0]]))
    assert torch.allclose(layer(x), expected)
    assert (layer.kept_columns, layer.tokens) == (4, 2)
    assert layer.read_per_token() == 2 * 3 * 4  # 2 columns of 3 float32 weights per token


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.7])
def test_measured_bytes_match_the_budget_on_calibration_tokens(llama, batches, budget):
    prepared = teal(llama, batches, budget)
    assert prepared.ffn_bytes.read_fraction == pytest.approx(budget, abs=0.02)
    assert prepared.ffn_bytes.resident_fraction == 1.0
    prepared.meter.reset()
    with torch.no_grad():
        for batch in batches:
            prepared.model(batch)
    measured = prepared.meter.read_per_token() / prepared.ffn_bytes.dense
    assert measured == pytest.approx(budget, abs=0.03)


def test_gated_ffn_sparsifies_gate_up_and_down_inputs(llama, batches):
    mlp = teal(llama, batches, 0.5).model.model.layers[0].mlp
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert isinstance(getattr(mlp, name), ThresholdSparseLinear)
    assert mlp.gate_proj.threshold == mlp.up_proj.threshold  # same input, same threshold


def test_plain_ffn_on_bert(bert, batches):
    layer = teal(bert, batches, 0.5).model.encoder.layer[0]
    assert isinstance(layer.intermediate.dense, ThresholdSparseLinear)
    assert isinstance(layer.output.dense, ThresholdSparseLinear)
    assert not isinstance(layer.attention.output.dense, ThresholdSparseLinear)


def test_the_model_passed_in_is_not_modified(llama, batches):
    snapshot = state_snapshot(llama)
    teal(llama, batches, 0.3)
    assert_unchanged(llama, snapshot)
    assert isinstance(llama.model.layers[0].mlp.up_proj, torch.nn.Linear)


def test_budget_one_keeps_every_nonzero_input(llama, batches):
    prepared = teal(llama, batches, 1.0)
    with torch.no_grad():
        assert torch.allclose(prepared.model(batches[0]).logits, llama(batches[0]).logits)
