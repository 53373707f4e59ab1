"""The gated matcher finds down(act(gate(x)) * up(x)) in every gated architecture, and declines the rest with
a reason."""
import doctest
import importlib
import operator

import pytest
import torch
import torch.nn.functional as F

from tardis_compiler.passes import capture_graphs
from tardis_compiler.passes import copy_graph_module, placeholder_fqns
from tardis_compiler.passes.find_gated_ffns import GatedFFNMatch, find_gated_ffns
from tests.tiny_models import (GATED_ARCHITECTURES, HIDDEN, LAYERS, FusedGatedBlock, ReGLUBlock, build_tiny,
                               token_batches)

EXPECTED_ACT = {"llama": "silu", "mistral": "silu", "qwen2": "silu", "phi3": "silu",
                "gemma": "gelu_tanh", "gemma3": "gelu_tanh"}


def _capture(model, *inputs, dynamic=None):
    """Like capture_graphs, with dynamo's ``dynamic`` flag."""
    graphs = []

    def backend(gm, example_inputs, **_):
        copy = copy_graph_module(gm)  # dynamo drops the placeholders' sources after compiling
        graphs.append((copy, placeholder_fqns(copy)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=dynamic)(*inputs)
    return graphs


def _find(model, *inputs, dynamic=None):
    graphs = _capture(model, *inputs, dynamic=dynamic)
    assert len(graphs) == 1, "expected 0 graph breaks"
    gm, fqns = graphs[0]
    return (*find_gated_ffns(gm, fqns), fqns)


def _reference(model: torch.nn.Module, m: GatedFFNMatch, fqns, x: torch.Tensor) -> torch.Tensor:
    """down(act(gate x) * up x) from the model's real parameters, located through the match."""
    param = lambda node: None if node is None else model.get_parameter(fqns[node])  # noqa: E731
    n = m.d_hidden

    def rows(spec, offset):
        w, b = param(spec.weight), param(spec.bias)
        w = w if spec.layout == "out_in" else w.t()
        return w[offset:offset + n], None if b is None else b[offset:offset + n]

    gw, gb = rows(m.gate, m.gate_offset)
    uw, ub = rows(m.up, m.up_offset)
    dw, db = param(m.down.weight), param(m.down.bias)
    dw = dw if m.down.layout == "out_in" else dw.t()
    return F.linear(m.activation.fn(F.linear(x, gw, gb)) * F.linear(x, uw, ub), dw, db)


def _assert_reproduces(model, matches, fqns, d_in, shape=(3, 5)):
    x = torch.randn(*shape, d_in)
    with torch.no_grad():
        for m in matches:
            module = model.get_submodule(m.name) if m.name else model
            torch.testing.assert_close(_reference(model, m, fqns, x), module(x), rtol=1e-5, atol=1e-5)


# --- HF architectures ----------------------------------------------------------------------------


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("arch", GATED_ARCHITECTURES)
def test_every_gated_layer_found(arch, dynamic):
    model = build_tiny(arch)
    matches, skipped, fqns = _find(model, token_batches(1)[0], dynamic=dynamic)
    assert not skipped
    assert [m.name for m in matches] == [f"model.layers.{i}.mlp" for i in range(LAYERS)]
    m = matches[0]
    assert (m.d_in, m.d_hidden, m.d_out) == (HIDDEN, model.config.intermediate_size, HIDDEN)
    assert m.activation.name == EXPECTED_ACT[arch]
    assert m.kind == "gated" and m.region and m.gate.bias is None and m.down.bias is None
    if arch == "phi3":
        assert m.up is m.gate and m.fused
        assert (m.gate_offset, m.up_offset) == (0, m.d_hidden)
        assert fqns[m.gate.weight] == "model.layers.0.mlp.gate_up_proj.weight"
        assert m.gate.out_features == 2 * m.d_hidden
        assert m.pattern == "fused linear -> chunk -> silu (op) * . -> linear"
    else:
        assert not m.fused and (m.gate_offset, m.up_offset) == (0, 0)
        assert fqns[m.gate.weight] == "model.layers.0.mlp.gate_proj.weight"
        assert fqns[m.up.weight] == "model.layers.0.mlp.up_proj.weight"
        assert m.pattern == f"linear -> {EXPECTED_ACT[arch]} (op) * linear -> linear"
    assert fqns[m.down.weight] == "model.layers.0.mlp.down_proj.weight"
    if not dynamic:
        _assert_reproduces(model, matches, fqns, HIDDEN)


def test_llama_mlp_bias_found_and_used():
    model = build_tiny("llama", mlp_bias=True)
    with torch.no_grad():  # HF zero-inits biases; make them matter for the numeric check
        for name, p in model.named_parameters():
            if ".mlp." in name and name.endswith("bias"):
                p.normal_()
    matches, skipped, fqns = _find(model, token_batches(1)[0])
    assert len(matches) == LAYERS and not skipped
    for m in matches:
        assert m.gate.bias is not None and m.up.bias is not None and m.down.bias is not None
        assert fqns[m.up.bias] == f"{m.name}.up_proj.bias"
    _assert_reproduces(model, matches, fqns, HIDDEN)


# --- in-memory blocks: activations, fused, operand orders ------------------------------------------


def test_reglu():
    block = ReGLUBlock().eval()
    matches, skipped, fqns = _find(block, torch.randn(4, 8))
    assert not skipped and len(matches) == 1
    m = matches[0]
    assert m.name == "" and m.activation.name == "relu" and (m.d_in, m.d_hidden, m.d_out) == (8, 16, 8)
    assert m.gate.bias is not None
    _assert_reproduces(block, matches, fqns, 8)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("up_first", [False, True])
@pytest.mark.parametrize("dynamic", [False, True])
def test_fused_gate_up_with_and_without_bias(bias, up_first, dynamic):
    block = FusedGatedBlock(bias=bias, act=lambda z: F.gelu(z, approximate="tanh"), up_first=up_first).eval()
    matches, skipped, fqns = _find(block, torch.randn(2, 3, 8), dynamic=dynamic)
    assert not skipped and len(matches) == 1
    m = matches[0]
    assert m.up is m.gate and (m.gate.bias is not None) == bias
    assert m.activation.name == "gelu_tanh" and (m.d_in, m.d_hidden, m.d_out) == (8, 16, 8)
    assert (m.gate_offset, m.up_offset) == ((16, 0) if up_first else (0, 16))
    _assert_reproduces(block, matches, fqns, 8)


class _Gated(torch.nn.Module):
    """down(act(gate x) * up x) with a pluggable product spelling."""

    def __init__(self, product=operator.mul, act=F.silu, d=8, m=16, m_up=None):
        super().__init__()
        self.gate = torch.nn.Linear(d, m)
        self.up = torch.nn.Linear(d, m if m_up is None else m_up)
        self.down = torch.nn.Linear(m, d)
        self.product, self.act = product, act

    def forward(self, x):
        return self.down(self.product(self.act(self.gate(x)), self.up(x)))


PRODUCTS = {
    "a*u": operator.mul, "u*a": lambda a, u: u * a,
    "torch.mul(a,u)": torch.mul, "torch.mul(u,a)": lambda a, u: torch.mul(u, a),
    "a.mul(u)": lambda a, u: a.mul(u), "u.mul(a)": lambda a, u: u.mul(a),
}


@pytest.mark.parametrize("spelling", PRODUCTS)
def test_product_spellings_and_operand_orders(spelling):
    block = _Gated(PRODUCTS[spelling]).eval()
    matches, skipped, fqns = _find(block, torch.randn(4, 8))
    assert not skipped and [m.activation.name for m in matches] == ["silu"]
    assert fqns[matches[0].gate.weight] == "gate.weight" and fqns[matches[0].up.weight] == "up.weight"
    _assert_reproduces(block, matches, fqns, 8)


def test_matmul_spellings():
    class MatmulGated(torch.nn.Module):  # gate x @ Wg.T + b, up x @ Wu (in, out), down x @ Wd.T
        def __init__(self):
            super().__init__()
            self.wg, self.bg = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(16))
            self.wu = torch.nn.Parameter(torch.randn(8, 16))
            self.wd = torch.nn.Parameter(torch.randn(8, 16))

        def forward(self, x):
            return (F.gelu(x @ self.wg.T + self.bg) * (x @ self.wu)) @ self.wd.t()

    block = MatmulGated().eval()
    matches, skipped, fqns = _find(block, torch.randn(4, 8))
    assert not skipped and len(matches) == 1
    m = matches[0]
    assert (m.gate.layout, m.up.layout, m.down.layout) == ("out_in", "in_out", "out_in")
    assert m.gate.bias is not None and m.up.bias is None and m.activation.name == "gelu"
    assert (m.d_in, m.d_hidden, m.d_out) == (8, 16, 8) and m.pattern == "matmul -> gelu (op) * matmul -> matmul"
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(_reference(block, m, fqns, x), block(x))


def test_activation_as_formula_and_views_around_the_product():
    class Viewed(_Gated):
        def forward(self, x):  # x: (b, t, d) -> tokens flattened around the product
            g = self.gate(x.reshape(-1, x.shape[-1]))
            u = self.up(x.view(-1, x.shape[-1]))
            p = (g * torch.sigmoid(g)) * u
            return self.down(p.view(-1, p.shape[-1]))

    block = Viewed().eval()
    matches, skipped, fqns = _find(block, torch.randn(2, 3, 8))
    assert not skipped and len(matches) == 1
    assert matches[0].activation.name == "silu" and matches[0].pattern.startswith("linear -> silu (formula of 2 ops)")


def test_metadata_queries_are_ignored_under_dynamic_shapes():
    class Sized(_Gated):
        def forward(self, x):
            a = F.silu(self.gate(x))
            p = a * self.up(x)
            return self.down(p.reshape(p.size(0), a.size(-1)))

    (matches, skipped, _) = _find(Sized().eval(), torch.randn(5, 8), dynamic=True)
    assert not skipped and len(matches) == 1


def test_plain_ffns_and_attention_are_not_gated():
    for arch in ("gpt2", "bert"):
        torch.compiler.reset()
        (gm, fqns), = capture_graphs(build_tiny(arch), token_batches(1)[0])
        assert find_gated_ffns(gm, fqns) == ([], [])


# --- declined, with reasons ----------------------------------------------------------------------


def _declined(block, x=None):
    matches, skipped, _ = _find(block.eval(), torch.randn(4, 8) if x is None else x)
    assert not matches and len(skipped) == 1
    return skipped[0]


def test_unknown_activation_is_declined():
    s = _declined(_Gated(act=lambda z: z / (1 + z.abs())))
    assert "register_activation_rule" in s.reason and s.name == ""


def test_product_used_twice_is_declined():
    class Twice(_Gated):
        def forward(self, x):
            p = F.silu(self.gate(x)) * self.up(x)
            return self.down(p) + p.sum(-1, keepdim=True)

    assert "product act(gate) * up is used 2 times" in _declined(Twice()).reason


def test_activation_output_used_twice_is_declined():
    class Twice(_Gated):
        def forward(self, x):
            a = F.silu(self.gate(x))
            return self.down(a * self.up(x)) + a.mean(-1, keepdim=True)

    assert "gate activation output is used 2 times" in _declined(Twice()).reason


def test_up_reading_another_input_is_declined():
    class TwoInputs(_Gated):
        def forward(self, x):
            return self.down(F.silu(self.gate(x)) * self.up(x + 1))

    assert "different inputs" in _declined(TwoInputs()).reason


def test_hidden_size_mismatch_is_declined():
    assert "hidden sizes disagree" in _declined(_Gated(m_up=1)).reason


class _FusedChunk(torch.nn.Module):
    """A fused gate/up linear split by ``split(h)`` instead of ``.chunk(2, dim=-1)``."""

    def __init__(self, out, split):
        super().__init__()
        self.gate_up, self.down = torch.nn.Linear(8, out), torch.nn.Linear(16, 8)
        self.split = split

    def forward(self, x):
        g, u = self.split(self.gate_up(x))[:2]
        return self.down(F.silu(g) * u)


def test_chunk_in_three_is_declined():
    s = _declined(_FusedChunk(48, lambda h: h.chunk(3, dim=-1)))
    assert "2 equal halves" in s.reason and "chunk(3, dim=-1)" in s.reason


def test_chunk_along_tokens_is_declined():
    s = _declined(_FusedChunk(16, lambda h: h.chunk(2, dim=0)), torch.randn(4, 8))
    assert "2 equal halves" in s.reason and "dim=0" in s.reason


def test_equal_split_is_accepted_like_chunk():
    matches, skipped, _ = _find(_FusedChunk(32, lambda h: h.split(16, dim=-1)).eval(), torch.randn(4, 8))
    assert not skipped and (matches[0].gate_offset, matches[0].up_offset) == (0, 16)


def test_docstring_examples():
    module = importlib.import_module("tardis_compiler.passes.find_gated_ffns")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted and not result.failed
