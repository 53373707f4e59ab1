"""ffn.py: FFN linears are found by name, attention projections are not."""
import pytest
import torch

from tardis_compiler.eval.ffn import dense_ffn_bytes, find_ffn_linears, set_submodule


def test_llama_gate_up_down(llama):
    found = find_ffn_linears(llama)
    assert [(f.name, f.role) for f in found[:3]] == [
        ("model.layers.0.mlp.gate_proj", "gate"), ("model.layers.0.mlp.up_proj", "up"),
        ("model.layers.0.mlp.down_proj", "down")]
    assert len(found) == 6 and {f.family for f in found} == {"llama"}


def test_bert_skips_attention_output_dense(bert):
    names = [f.name for f in find_ffn_linears(bert)]
    assert names == ["encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense",
                     "encoder.layer.1.intermediate.dense", "encoder.layer.1.output.dense"]


def test_dense_bytes_count_weight_matrices_only(llama, bert):
    assert dense_ffn_bytes(llama) == 2 * 3 * 32 * 64 * 4
    assert dense_ffn_bytes(bert) == 2 * 2 * 32 * 64 * 4


def test_a_model_without_known_ffn_names_gets_a_pointer_to_the_table():
    with pytest.raises(ValueError, match="FFN_LINEAR_PATTERNS"):
        find_ffn_linears(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_set_submodule_replaces_by_qualified_name(llama):
    set_submodule(llama, "model.layers.1.mlp.up_proj", torch.nn.Identity())
    assert isinstance(llama.model.layers[1].mlp.up_proj, torch.nn.Identity)
