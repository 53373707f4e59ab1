"""The activation registry: built-ins, numeric identification, and user rules that get models rewritten."""
import pytest
import sympy
import torch

import tardis_compiler as tc
from tardis_compiler.activations import identify_activation


@pytest.mark.parametrize("fn,name", [
    (torch.nn.functional.gelu, "gelu"), (lambda z: torch.nn.functional.gelu(z, approximate="tanh"), "gelu_tanh"),
    (torch.relu, "relu"), (torch.nn.functional.silu, "silu"), (lambda z: z * torch.sigmoid(1.702 * z), "quick_gelu"),
])
def test_builtins_identify_themselves(fn, name):
    assert identify_activation(fn).name == name


def test_unknown_function_is_not_identified():
    assert identify_activation(torch.tanh) is None


def test_register_validates():
    with pytest.raises(ValueError, match="exactly one"):
        tc.register_activation_rule("x")
    with pytest.raises(ValueError, match="already exists"):
        tc.register_activation_rule("gelu", torch.relu)
    with pytest.raises(ValueError, match="same shape"):
        tc.register_activation_rule("bad", lambda z: z.sum())
    with pytest.raises(KeyError, match="register_activation_rule"):
        tc.get_activation_rule("nope")


class _SoftsignMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        z = self.up(x)
        return self.down(z / (1 + z.abs()))


@pytest.mark.parametrize("how", ["torch", "sympy"])
def test_user_rule_gets_a_model_rewritten(how):
    model = _SoftsignMLP().eval()
    x = torch.randn(32, 16)
    before = tc.explain(model, x, inner="eager", calibration_calls=1, guard="all")
    assert before.ffns[0].status == "skipped"
    torch.compiler.reset()
    if how == "torch":
        tc.register_activation_rule("softsign", lambda z: z / (1 + z.abs()))
    else:
        z = sympy.Symbol("z")
        tc.register_activation_rule("softsign", sympy_expr=z / (1 + sympy.Abs(z)))
    try:
        report = tc.explain(model, x, inner="eager", calibration_calls=1, guard="all")
        assert report.ffns[0].status == "rewritten" and report.ffns[0].activation == "softsign"
        torch.compiler.reset()
        compiled = torch.compile(model, backend="tardis", options={"calibration_calls": 1, "guard": "all", "inner": "eager",
                                                                    "dense_above": None})  # 32 tokens: the pack
        with torch.no_grad():
            compiled(x)
            torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    finally:
        tc.unregister_activation_rule("softsign")
