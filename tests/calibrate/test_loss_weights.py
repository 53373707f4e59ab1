import pytest
import torch

import tardis_compiler as tc
from tardis_compiler.calibrate.loss_weights import output_gradients
from tests.tiny_models import build_tiny, token_batches


def test_fisher_of_a_model_whose_loss_is_half_its_squared_output():
    """For ``loss = |y|^2 / 2`` the output gradient is y itself: F = E[y y^T]."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    x = torch.randn(64, 8)
    grads = output_gradients(mlp, [x[:32], x[32:]])
    with torch.no_grad():
        y = mlp(x)
    torch.testing.assert_close(grads.fisher(""), (y.t() @ y / 64).double(), atol=1e-5, rtol=1e-4)
    assert grads.tokens[""] == 64


def test_a_causal_lm_gets_a_weight_per_ffn_and_its_weights_stay_untouched():
    model = build_tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = output_gradients(model, token_batches(2))
    assert sorted(grads.sums) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for name in grads.sums:
        eig = torch.linalg.eigvalsh(grads.fisher(name))
        assert eig.min() > -1e-9 and eig.max() > 0  # positive semi-definite, not zero
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loss_allocation_meets_the_budget_overall(arch):
    model = build_tiny(arch)
    config = tc.CalibrationConfig(progress=False, group_size=32, allocation="loss")
    profile = tc.calibrate_for_budget(model, token_batches(4), 0.5, config=config)
    fractions = [f.stats["policy"]["calibration_bytes_fraction"] for f in profile.ffns.values()]
    assert sum(fractions) / len(fractions) <= 0.5 + 1e-6  # the FFNs are the same size here
    assert max(fractions) - min(fractions) > 0.01  # shared, not split evenly


def test_loss_allocation_needs_the_batches_with_a_recorder():
    model = build_tiny("llama")
    config = tc.CalibrationConfig(progress=False, group_size=32, allocation="loss")
    recorder = tc.record(model, token_batches(2), config)
    with pytest.raises(ValueError, match="pass them along"):
        tc.calibrate_for_budget(model, None, 0.5, config=config, recorder=recorder)
