"""The tardis eval method: meets its budget, measures bytes on the text it runs, leaves the model
alone, and says clearly when a model has no FFN it can fold."""
import pytest
import torch

from tardis_compiler.eval.tardis_method import MethodNotApplicable, tardis
from tests.eval.helpers import tiny_llama
from tests.tiny_models import build_tiny, token_batches


def test_tardis_method_meets_budget_and_meter_measures():
    model = build_tiny("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = tardis(model, token_batches(6), 0.8)
    assert prepared.ffn_bytes.read_fraction <= 0.8 + 0.03  # met on the fit tokens; held-out flag noise
    assert prepared.ffn_bytes.resident_fraction > 1.0  # the exact path keeps W1 and W2
    prepared.meter.reset()
    with torch.no_grad():
        prepared.model(token_batches(1, seed=4)[0])
    measured = prepared.meter.read_per_token() / prepared.ffn_bytes.dense
    assert 0.2 < measured < 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_tardis_method_on_a_gated_model_meets_the_budget_per_neuron():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = tardis(model, [torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(i))
                              for i in range(4)], 0.5)
    assert prepared.ffn_bytes.read_fraction <= 0.5 + 1e-6
    assert prepared.details["guard"] == ["int4"] and prepared.details["policy"]
    prepared.meter.reset()
    with torch.no_grad():
        prepared.model(torch.randint(0, 128, (1, 24)))
    assert 0.05 < prepared.meter.read_per_token() / prepared.ffn_bytes.dense < 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_tardis_method_on_a_model_without_ffns_is_not_applicable():
    attention_only = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).eval()
    with pytest.raises(MethodNotApplicable, match="no FFN"):
        tardis(attention_only, [torch.randn(4, 8)], 0.5)


def test_tardis_is_registered_by_default():
    from tardis_compiler.eval import method_names
    assert "tardis" in method_names()
