"""Activation rules: how to recognise an activation in an FX graph, and how to evaluate it exactly.

A rule is recognised in two ways. Fast: the activation is one graph node whose target is in
``rule.targets`` (and ``rule.accepts(node)`` agrees, e.g. ``gelu(approximate="none")``).
Robust: the activation is any elementwise subgraph (GPT-2's ``gelu_new``, BLOOM's tanh formula,
``x * sigmoid(1.702 x)``); the matcher evaluates that subgraph on a probe vector and compares it
with every rule's ``fn``. So a rule needs only an exact torch function; ``targets`` is an
optimisation and a tie-breaker.

The exact fallback path of a rewritten FFN calls ``rule.fn`` on the flagged neurons, so a rule's
function must be exact (not an approximation) for the exactness invariant to hold.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterable

import sympy
import torch
import torch.nn.functional as F

ActivationFn = Callable[[torch.Tensor], torch.Tensor]

# Probe points used to identify an elementwise subgraph. Dense around 0 where activations differ,
# wide enough to separate e.g. SiLU from quick_gelu and the erf GELU from the tanh one, and out to
# +-1e4 so a subgraph that only departs from a rule far out (a clamp, a saturation) is not taken
# for it: the exact path evaluates the rule wherever a pre-activation lands.
_WIDE = torch.logspace(1.0, 4.0, 31)
_PROBE = torch.cat([torch.linspace(-12.0, 12.0, 241), torch.linspace(-3.0, 3.0, 121), _WIDE, -_WIDE]).double()


@dataclasses.dataclass(frozen=True)
class ActivationRule:
    """An activation the compiler can fold.

    Args:
        name: registry key, also written into profiles and the explain report.
        fn: exact elementwise torch function, used for the exact fallback path.
        targets: FX ``call_function``/``call_method`` targets that *are* this activation when
            they form the whole activation subgraph (a speed-up over numeric identification).
        accepts: optional check on such a node (e.g. its kwargs); return False to decline.
        atol: tolerance of the numeric identification.

    Example:
        >>> rule = ActivationRule("softsign", lambda z: z / (1 + z.abs()))
        >>> rule.fn(torch.tensor([1.0])).item()
        0.5
    """

    name: str
    fn: ActivationFn
    targets: tuple = ()
    accepts: Callable[[torch.fx.Node], bool] | None = None
    atol: float = 2e-5

    def matches_node(self, node: torch.fx.Node) -> bool:
        """True if ``node`` alone is this activation."""
        if node.target not in self.targets:
            return False
        return self.accepts is None or bool(self.accepts(node))

    def matches_values(self, probe: torch.Tensor, values: torch.Tensor) -> bool:
        """True if ``values`` (a subgraph evaluated on ``probe``) equal ``fn(probe)``."""
        expected = self.fn(probe)
        scale = expected.abs().clamp(min=1.0)
        return bool(((values.double() - expected.double()).abs() <= self.atol * scale).all())


_RULES: dict[str, ActivationRule] = {}


def register_activation_rule(
    name: str,
    fn: ActivationFn | None = None,
    *,
    sympy_expr: sympy.Expr | str | None = None,
    targets: Iterable = (),
    accepts: Callable[[torch.fx.Node], bool] | None = None,
    atol: float = 2e-5,
    override: bool = False,
) -> ActivationRule:
    """Register an activation so FFNs that use it are rewritten.

    Give either a torch function ``fn`` or a sympy expression in one free symbol (a string is
    parsed with ``sympy.sympify``); the expression is turned into a torch function.

    Example:
        >>> import tardis_compiler as tc
        >>> rule = tc.register_activation_rule("softsign_demo", sympy_expr="z / (1 + Abs(z))")
        >>> round(rule.fn(torch.tensor([3.0])).item(), 4)
        0.75
        >>> tc.unregister_activation_rule("softsign_demo")
    """
    if (fn is None) == (sympy_expr is None):
        raise ValueError("register_activation_rule needs exactly one of fn= or sympy_expr=")
    if name in _RULES and not override:
        raise ValueError(f"activation rule {name!r} already exists; pass override=True to replace it")
    if sympy_expr is not None:
        fn = _torch_fn_from_sympy(sympy_expr)
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _check_elementwise(name, fn)
    rule = ActivationRule(name=name, fn=fn, targets=tuple(targets), accepts=accepts, atol=atol)
    _RULES[name] = rule
    return rule


def unregister_activation_rule(name: str) -> None:
    """Remove a rule (mostly for tests). Example: ``unregister_activation_rule("my_act")``."""
    _RULES.pop(name, None)


def get_activation_rule(name: str) -> ActivationRule:
    """Look a rule up by name.

    Example:
        >>> get_activation_rule("relu").fn(torch.tensor([-1.0, 2.0])).tolist()
        [0.0, 2.0]
    """
    try:
        return _RULES[name]
    except KeyError:
        raise KeyError(
            f"no activation rule named {name!r}; known: {sorted(_RULES)}. "
            "Register it with tardis_compiler.register_activation_rule(name, fn)."
        ) from None


def activation_rules() -> list[ActivationRule]:
    """All registered rules, built-ins first. Example: ``[r.name for r in activation_rules()]``."""
    return list(_RULES.values())


def identify_activation(fn_of_probe: Callable[[torch.Tensor], torch.Tensor]) -> ActivationRule | None:
    """Return the rule whose function equals ``fn_of_probe`` on the probe points, or None.

    Example:
        >>> identify_activation(lambda z: z * torch.sigmoid(z)).name
        'silu'
    """
    values = fn_of_probe(_PROBE.clone())
    if not isinstance(values, torch.Tensor) or values.shape != _PROBE.shape:
        return None
    for rule in _RULES.values():
        if rule.matches_values(_PROBE, values):
            return rule
    return None


def _torch_fn_from_sympy(expr: sympy.Expr | str) -> ActivationFn:
    expr = sympy.sympify(expr)
    symbols = sorted(expr.free_symbols, key=str)
    if len(symbols) != 1:
        raise ValueError(f"an activation expression needs exactly one free symbol, got {symbols}")
    return sympy.lambdify(symbols, expr, modules="torch")


def _check_elementwise(name: str, fn: ActivationFn) -> None:
    probe = _PROBE[:16].clone()
    try:
        out = fn(probe)
    except Exception as exc:  # report which rule is broken, not a bare traceback
        raise ValueError(f"activation rule {name!r} failed on a float64 tensor: {exc}") from exc
    if not isinstance(out, torch.Tensor) or out.shape != probe.shape:
        raise ValueError(f"activation rule {name!r} must map a tensor to a tensor of the same shape")


def _gelu_kind(node: torch.fx.Node) -> str:
    if len(node.args) > 1:
        return node.args[1]
    return node.kwargs.get("approximate", "none")


def _quick_gelu(z: torch.Tensor) -> torch.Tensor:
    return z * torch.sigmoid(1.702 * z)


_GELU_TARGETS = (F.gelu, torch._C._nn.gelu, "gelu")
register_activation_rule(
    "gelu", lambda z: F.gelu(z), targets=_GELU_TARGETS, accepts=lambda n: _gelu_kind(n) == "none"
)
register_activation_rule(
    "gelu_tanh",
    lambda z: F.gelu(z, approximate="tanh"),
    targets=_GELU_TARGETS,
    accepts=lambda n: _gelu_kind(n) == "tanh",
)
register_activation_rule("quick_gelu", _quick_gelu)
register_activation_rule("relu", torch.relu, targets=(torch.relu, F.relu, "relu"))
register_activation_rule("silu", F.silu, targets=(F.silu, "silu"))

#: The built-in rules as registered at import: the fused CPU kernel evaluates these itself.
_BUILTIN: dict[str, ActivationRule] = dict(_RULES)


def is_builtin(name: str) -> bool:
    """True if ``name`` is a built-in rule that no ``override=True`` registration has replaced
    (only those run in the fused CPU kernel; others take the torch path).

    Example:
        >>> is_builtin("silu"), is_builtin("softsign_demo")
        (True, False)
    """
    rule = _BUILTIN.get(name)
    return rule is not None and _RULES.get(name) is rule


# sqrt(2/pi) as the formula GELUs spell it; kept here so tests can build such graphs by hand.
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
