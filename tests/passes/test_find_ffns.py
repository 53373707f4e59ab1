"""The matcher finds every plain FFN of every supported architecture, and declines the rest with a reason."""
import pytest
import torch
import torch.nn.functional as F

from tardis_compiler.passes import capture_graphs
from tardis_compiler.passes import find_ffns
from tests.tiny_models import LAYERS, build_tiny, token_batches

EXPECTED = {
    "gpt2": ("transformer.h.0.mlp", "addmm", "gelu_tanh"),
    "bert": ("encoder.layer.0", "linear", "gelu"),
    "opt": ("model.decoder.layers.0", "linear", "relu"),
    "falcon": ("transformer.h.0.mlp", "matmul", "gelu"),
    "bloom": ("transformer.h.0.mlp", "linear", "gelu_tanh"),
    "gpt_neox": ("gpt_neox.layers.0.mlp", "linear", "gelu"),
}


def _matches(model, *inputs, dynamic=None):
    graphs = []

    def backend(gm, example_inputs, **_):
        from tardis_compiler.passes import placeholder_fqns
        graphs.append(find_ffns(gm, placeholder_fqns(gm)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=dynamic)(*inputs)
    return graphs


@pytest.mark.parametrize("dynamic", [False, True])
def test_every_layer_found_in_one_graph(tiny_arch, dynamic):
    model = build_tiny(tiny_arch)
    graphs = _matches(model, token_batches(1)[0], dynamic=dynamic)
    assert len(graphs) == 1, "expected 0 graph breaks"
    matches, skipped = graphs[0]
    assert not skipped
    assert len(matches) == LAYERS
    name, spelling, act = EXPECTED[tiny_arch]
    assert matches[0].name == name
    assert matches[0].first.spelling == spelling and matches[0].activation.name == act
    assert (matches[0].d_in, matches[0].d_out) == (32, 32)


def test_graph_breaks_zero_with_dynamo_explain(tiny_arch):
    explanation = torch._dynamo.explain(build_tiny(tiny_arch))(token_batches(1)[0])
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("bias", [True, False])
def test_falcon_matmul_spelling_with_and_without_bias(bias):
    model = build_tiny("falcon", bias=bias)
    (matches, _), = _matches(model, token_batches(1)[0])
    assert len(matches) == LAYERS
    assert (matches[0].first.bias is not None) == bias


class _MLP(torch.nn.Module):
    def __init__(self, act, bias=True):
        super().__init__()
        self.up = torch.nn.Linear(8, 32, bias=bias)
        self.down = torch.nn.Linear(32, 8, bias=bias)
        self.act = act

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("act,rule", [
    (torch.nn.GELU(), "gelu"), (torch.nn.GELU(approximate="tanh"), "gelu_tanh"),
    (torch.nn.ReLU(), "relu"), (torch.nn.SiLU(), "silu"),
    (lambda z: z * torch.sigmoid(1.702 * z), "quick_gelu"),
    (lambda z: 0.5 * z * (1.0 + torch.tanh(0.7978845608 * (z + 0.044715 * torch.pow(z, 3.0)))), "gelu_tanh"),
])
@pytest.mark.parametrize("shape", [(5, 8), (2, 5, 8)])
def test_activations_and_input_ranks(act, rule, shape):
    (matches, _), = _matches(_MLP(act).eval(), torch.randn(shape))
    assert [m.activation.name for m in matches] == [rule]
    assert matches[0].name == ""


def test_no_bias_linear_found():
    (matches, _), = _matches(_MLP(torch.nn.GELU(), bias=False).eval(), torch.randn(4, 8))
    assert matches[0].first.bias is None and matches[0].second.bias is None


def test_unknown_activation_is_skipped_with_reason():
    (matches, skipped), = _matches(_MLP(lambda z: z / (1 + z.abs())).eval(), torch.randn(4, 8))
    assert not matches
    assert "register_activation_rule" in skipped[0].reason


def test_an_activation_that_departs_from_a_rule_far_out_is_not_taken_for_it():
    """clamp(gelu(z), max=20) equals gelu on [-12, 12]: it must not be folded as gelu."""
    import tardis_compiler as tc

    mlp = _MLP(lambda z: torch.clamp(F.gelu(z), max=20.0)).eval()
    (matches, skipped), = _matches(mlp, torch.randn(4, 8))
    assert not matches and skipped
    with torch.no_grad():
        mlp.up.weight.mul_(30.0)  # pre-activations far beyond 20
    x = torch.randn(4, 8)
    fast = torch.compile(mlp, backend="tardis", options={"guard": "all", "inner": "eager", "calibration_calls": 1,
                                                         "calibration": {"progress": False}})
    with torch.no_grad():
        torch.testing.assert_close(fast(x), mlp(x))
    assert tc.explain(mlp, x, inner="eager", calibration_calls=1).ffns[0].status == "skipped"


def test_activation_used_twice_is_skipped():
    class Twice(_MLP):
        def forward(self, x):
            h = F.gelu(self.up(x))
            return self.down(h) + h.sum(-1, keepdim=True)

    (matches, skipped), = _matches(Twice(torch.nn.GELU()).eval(), torch.randn(4, 8))
    assert not matches and "used 2 times" in skipped[0].reason


def test_gated_ffn_is_matched_as_gated_not_plain():
    class Gated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up = torch.nn.Linear(8, 32), torch.nn.Linear(8, 32)
            self.down = torch.nn.Linear(32, 8)

        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x))

    (matches, skipped), = _matches(Gated().eval(), torch.randn(4, 8))
    assert [m.kind for m in matches] == ["gated"] and not skipped


def test_a_norm_after_a_linear_is_not_reported_as_an_ffn():
    """Gemma3's o_proj feeds RMSNorm directly; its pow(2) is not an activation of an FFN."""
    from tests.tiny_models import build_tiny, token_batches

    (matches, skipped), = _matches(build_tiny("gemma3"), token_batches(1)[0])
    assert len(matches) == 2 and not skipped


def test_attention_and_pooler_are_not_ffns():
    # BERT's pooler is linear -> tanh -> output: FFN-shaped start, but no second linear.
    (matches, skipped), = _matches(build_tiny("bert"), token_batches(1)[0])
    assert len(matches) == LAYERS and not skipped


def test_capture_graphs_gives_fqns():
    (gm, fqns), = capture_graphs(_MLP(torch.nn.GELU()).eval(), torch.randn(2, 8))
    assert sorted(fqns.values()) == ["down.bias", "down.weight", "up.bias", "up.weight"]
