"""calibration_stats.py: input statistics are right, cached, and leave the model untouched."""
import pytest
import torch

from tardis_compiler.eval.calibration_stats import ffn_input_stats

from tests.eval.helpers import assert_unchanged, state_snapshot


def _inputs(model, batches, name):
    seen = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, args, out: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for batch in batches:
            model(batch)
    handle.remove()
    return torch.cat(seen)


def test_feature_norms_match_a_direct_computation(llama, batches):
    stats = ffn_input_stats(llama, batches)
    for name in ("model.layers.0.mlp.up_proj", "model.layers.1.mlp.down_proj"):
        x = _inputs(llama, batches, name).double()
        assert torch.allclose(stats[name].feature_norm, x.pow(2).sum(0).sqrt(), rtol=1e-5)
        assert stats[name].tokens == 4 * 16


def test_gate_and_up_get_identical_magnitude_samples(llama, batches):
    stats = ffn_input_stats(llama, batches)
    gate, up = stats["model.layers.0.mlp.gate_proj"], stats["model.layers.0.mlp.up_proj"]
    assert torch.equal(gate.abs_sample, up.abs_sample)


def test_quantile_of_the_sample(llama, batches):
    stats = ffn_input_stats(llama, batches)["model.layers.0.mlp.down_proj"]
    threshold = stats.magnitude_quantile(0.7)
    assert float((stats.abs_sample <= threshold).float().mean()) == pytest.approx(0.7, abs=0.01)
    assert stats.magnitude_quantile(0.0) == 0.0


def test_cached_until_weights_change_and_no_hooks_left(llama, batches):
    snapshot = state_snapshot(llama)
    first = ffn_input_stats(llama, batches)
    assert ffn_input_stats(llama, batches) is first
    assert_unchanged(llama, snapshot)
    assert all(not m._forward_hooks for m in llama.modules())
    with torch.no_grad():
        llama.model.layers[0].mlp.up_proj.weight.mul_(2)
    assert ffn_input_stats(llama, batches) is not first


def test_padded_or_empty_batches_are_refused(llama):
    padded = {"input_ids": torch.ones(1, 4, dtype=torch.long),
              "attention_mask": torch.tensor([[1, 1, 0, 0]])}
    with pytest.raises(ValueError, match="padded"):
        ffn_input_stats(llama, [padded])
    with pytest.raises(ValueError, match="at least one batch"):
        ffn_input_stats(llama, [])


def test_dict_batches_work(bert, batches):
    dict_batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in batches]
    stats = ffn_input_stats(bert, dict_batches)
    assert stats["encoder.layer.1.output.dense"].squared_sum.shape == (64,)
