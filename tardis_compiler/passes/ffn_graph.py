"""Match: the FX graph vocabulary both FFN matchers share (``find_plain_ffns``, ``find_gated_ffns``).

Linear spellings (``as_linear``: ``linear``, Conv1D's ``addmm``, ``x @ W.T`` + b), shape-only ops
(view/reshape/eval-mode dropout), the elementwise region an activation input feeds, numeric
identification of that region against the activation registry, and shape and name helpers that
never evaluate a symbolic size (so dynamic-shape graphs are never specialised).
"""
from __future__ import annotations

import dataclasses
import operator
import re

import torch
import torch.nn.functional as F
from torch.fx import Node

from ..activations import ActivationRule, activation_rules, identify_activation

#: Ops that only change how tokens are laid out (never the neuron dimension, checked separately).
_SHAPE_ONLY_METHODS = {"view", "reshape", "contiguous"}
_SHAPE_ONLY_FUNCTIONS = {torch.reshape}

#: Elementwise ops an activation subgraph may contain (scalars and z as operands only).
_POINTWISE_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, operator.neg,
    torch.add, torch.sub, torch.mul, torch.div, torch.pow, torch.neg, torch.tanh, torch.erf,
    torch.sigmoid, torch.exp, torch.relu, torch.abs, torch.clamp, torch.clamp_min, torch.square,
    torch.sqrt, torch.rsqrt, torch.maximum, torch.minimum, torch.where, torch.special.erf,
    F.gelu, F.relu, F.silu, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.softplus, F.mish,
    F.hardswish, F.relu6, torch._C._nn.gelu, torch._C._nn.silu,
}
_POINTWISE_METHODS = {
    "add", "sub", "mul", "div", "pow", "neg", "tanh", "sigmoid", "exp", "relu", "erf", "abs",
    "clamp", "square", "sqrt", "rsqrt", "float", "to", "type_as", "__add__", "__mul__",
}


@dataclasses.dataclass
class LinearSpec:
    """A linear layer as the graph spells it.

    ``node`` produces the result (the bias add when the bias is a separate op); ``layout`` is
    "out_in" for nn.Linear weights (out_features, in_features) and "in_out" for Conv1D / ``x @ W``.
    """

    node: Node
    x: Node
    weight: Node
    bias: Node | None
    layout: str
    spelling: str

    @property
    def in_features(self) -> int:
        shape = shape_of(self.weight)
        return shape[1] if self.layout == "out_in" else shape[0]

    @property
    def out_features(self) -> int:
        shape = shape_of(self.weight)
        return shape[0] if self.layout == "out_in" else shape[1]


@dataclasses.dataclass
class SkippedFFN:
    """An FFN-shaped pattern left untouched, with the reason."""

    name: str
    pattern: str
    reason: str


def as_linear(node: Node, fqns: dict[Node, str]) -> LinearSpec | None:
    """Recognise ``node`` as a linear layer with a parameter weight, or return None.

    Spellings: ``linear(x, W, b)``; ``addmm(b, x, W)`` (Conv1D, W is (in, out));
    ``matmul(x, W.T)`` / ``x @ W.T`` (+ b), and ``x @ W`` (W is (in, out)).
    """
    if node.op != "call_function":
        return None
    if node.target in (torch._C._nn.linear, F.linear):
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if _is_param(weight, fqns) and (bias is None or _is_param(bias, fqns)):
            return LinearSpec(node, x, weight, bias, "out_in", "linear")
        return None
    if node.target is torch.addmm:
        if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 3:
            return None
        bias, x, weight = node.args
        if _is_param(weight, fqns) and _is_param(bias, fqns) and len(shape_of(bias)) == 1:
            return LinearSpec(node, x, weight, bias, "in_out", "addmm")
        return None
    if node.target in (operator.matmul, torch.matmul) and len(node.args) == 2:
        x, w_expr = node.args
        weight, layout = _weight_through_transpose(w_expr, fqns)
        if weight is None:
            return None
        spec = LinearSpec(node, x, weight, None, layout, "matmul")
        bias_add = single_user(node)
        if bias_add is not None and bias_add.target in (operator.add, operator.iadd, torch.add):
            other = [a for a in bias_add.args if a is not node]
            if len(other) == 1 and _is_param(other[0], fqns) and len(shape_of(other[0])) == 1:
                spec.node, spec.bias = bias_add, other[0]
        return spec
    return None


def _weight_through_transpose(node, fqns) -> tuple[Node | None, str]:
    if _is_param(node, fqns) and len(shape_of(node)) == 2:
        return node, "in_out"
    if not isinstance(node, Node):
        return None, ""
    base = node.args[0] if node.args else None
    is_t = (
        (node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"))
        or (node.op == "call_method" and node.target == "t")
        or (node.op == "call_function" and node.target in (torch.t,))
        or (node.op in ("call_method", "call_function") and target_name(node) == "transpose"
            and sorted(int(a) % 2 for a in node.args[1:3]) == [0, 1])
    )
    if is_t and _is_param(base, fqns) and len(shape_of(base)) == 2:
        return base, "out_in"
    return None, ""


def _is_param(node, fqns: dict[Node, str]) -> bool:
    return isinstance(node, Node) and node in fqns


def elementwise_region(z: Node) -> tuple[list[Node], list[tuple[Node, Node]]]:
    """Nodes computed elementwise from z alone, and the (region node, outside user) exits."""
    inside = {z}
    region: list[Node] = []
    # Graph order is a topological order, so one forward sweep from z settles membership.
    node = z.next
    while node.op != "output":
        tensors = _tensor_inputs(node)
        if _is_pointwise(node) and tensors and tensors <= inside:
            inside.add(node)
            region.append(node)
        node = node.next
    exits = [(n, u) for n in inside for u in n.users if u not in inside and not is_metadata_query(u)]
    return region, exits


def identify_region(region: list[Node], z: Node, out: Node) -> tuple[ActivationRule | None, str]:
    """The activation rule ``region`` (fed by ``z``, result ``out``) computes, and how it was told:
    a single op a rule matches, else the region evaluated on probes (``identify_activation``);
    None (and why) when no rule fits or the region cannot be evaluated."""
    if len(region) == 1:
        for rule in activation_rules():
            if rule.matches_node(region[0]):
                return rule, "op"
    how = f"formula of {len(region)} ops" if len(region) > 1 else f"op {target_name(region[0])}"

    def evaluate(probe: torch.Tensor) -> torch.Tensor:
        env = {n: _scalar_hint(n) for r in region for n in r.all_input_nodes if _is_scalar(n)}
        env[z] = probe
        for n in region:
            args = torch.fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
            if n.op == "call_method":
                env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                env[n] = n.target(*args, **kwargs)
        return env[out]

    try:
        with torch.no_grad():
            return identify_activation(evaluate), how
    except Exception as exc:  # an op that rejects float64 probes etc.: decline, don't crash
        return None, f"{how} (not evaluable: {type(exc).__name__})"


def is_shape_only(node: Node) -> bool:
    """A view/reshape/contiguous, or dropout in eval mode: changes how tokens are laid out only."""
    if node.op == "call_method" and node.target in _SHAPE_ONLY_METHODS:
        return True
    if node.op == "call_function" and node.target in _SHAPE_ONLY_FUNCTIONS:
        return True
    if node.op == "call_function" and node.target is F.dropout:
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
        return training is False
    return False


def _is_pointwise(node: Node) -> bool:
    if node.op == "call_function":
        return node.target in _POINTWISE_FUNCTIONS or is_shape_only(node) and node.target is F.dropout
    if node.op == "call_method":
        if node.target == "to":  # a dtype cast is elementwise; a device move is not our business
            return all(not isinstance(a, (str, torch.device)) for a in node.args[1:])
        return node.target in _POINTWISE_METHODS
    return False


def _tensor_inputs(node: Node) -> set[Node]:
    # Scalar inputs (e.g. a SymFloat sqrt(2/pi) under dynamic shapes) are constants w.r.t. z.
    return {n for n in node.all_input_nodes if not _is_scalar(n)}


def _is_scalar(node: Node) -> bool:
    return isinstance(node.meta.get("example_value"), (int, float, torch.SymInt, torch.SymFloat))


def _scalar_hint(node: Node):
    """A scalar node's value as traced, read from its hint so no guard is installed."""
    value = node.meta["example_value"]
    if isinstance(value, (torch.SymInt, torch.SymFloat)):
        hint = value.node.hint
        if hint is None:
            raise ValueError(f"{node.name} has no concrete hint")
        return hint
    return value


def is_metadata_query(node: Node) -> bool:
    """``x.size()``, ``x.size(-1)``, ``x.dim()``...: reads the shape, not the values. Under dynamic
    shapes dynamo adds such users; they don't make a value "used" (and once the op is traced,
    sizes are symbolic expressions, so the nodes they hang on are dead code for inductor)."""
    if node.op == "call_method" and node.target in ("size", "dim", "numel", "stride"):
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "dtype", "device")


def single_user(node: Node) -> Node | None:
    """The one node reading ``node``'s value (shape queries aside), or None."""
    users = [u for u in node.users if not is_metadata_query(u)]
    return users[0] if len(users) == 1 else None


def shape_of(node) -> tuple:
    """The traced shape of a tensor node (possibly symbolic sizes); () for anything else."""
    value = node.meta.get("example_value") if isinstance(node, Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def last_dim_of(node: Node):
    """The traced size of ``node``'s last dimension (an int or a SymInt), or None."""
    shape = shape_of(node)
    return shape[-1] if shape else None


def same_token_layout(first: LinearSpec, second: LinearSpec) -> bool:
    """The fused op maps x (..., d) to (..., d_out); it can replace ``second`` only if that has
    the same leading shape, or is the 2-D flattening of it (Conv1D's view(-1, d))."""
    # str() compares symbolic sizes (s0, s1) without evaluating them, so no guard is installed.
    lead_in = tuple(map(str, shape_of(first.x)[:-1]))
    lead_out = tuple(map(str, shape_of(second.node)[:-1]))
    return lead_in == lead_out or len(lead_out) == 1


def static_eq(a, b) -> bool:
    """Equality of sizes that never specialises a SymInt (a symbolic size is never a hidden size)."""
    return isinstance(a, int) and isinstance(b, int) and a == b


def target_name(node: Node) -> str:
    """The name of what ``node`` calls (a method name, or the function's ``__name__``)."""
    target = node.target
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


_FQN_PART = re.compile(r"_(?:modules|parameters|buffers)\['([^']+)'\]")


def placeholder_fqn(node: Node) -> str | None:
    """Module FQN of a placeholder that is model state (``a.b.weight``), or None for user inputs."""
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", None)
    if not source:
        return None
    name = source() if callable(source) else source
    parts = _FQN_PART.findall(name)
    if not parts or not re.search(r"_(?:parameters|buffers)\[", name):
        return None
    return ".".join(parts)


def module_of(fqn: str) -> str:
    """The module part of a parameter's FQN: ``"a.b"`` for ``"a.b.weight"``, ``""`` at the root."""
    return fqn.rsplit(".", 1)[0] if "." in fqn else ""
