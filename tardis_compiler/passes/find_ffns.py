"""Match: find every plain FFN ``linear -> activation -> linear`` in a dynamo FX graph.

"Anchor and walk" rather than subgraph isomorphism, because real graphs spell the same FFN many
ways (``linear``; GPT-2 Conv1D ``addmm`` between views; Falcon ``x @ W.T``; activations as one op
or as a formula spread over ten nodes). For every linear whose weight is a model parameter we:

1. walk down through shape-only ops (view/reshape/eval-mode dropout) to the activation input z;
2. grow the elementwise region fed by z alone, and require it to have one exit, consumed
   (through shape-only ops) by another parameter-fed linear;
3. evaluate the region on a probe vector and look it up in the activation registry.

Anything FFN-shaped that fails a check is reported with the reason and left untouched.
"""
from __future__ import annotations

import dataclasses
import operator
import re

import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

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
_NONLINEAR_HINT = re.compile(r"gelu|relu|silu|sigmoid|tanh|erf|exp|softplus|mish|elu|swish|pow|clamp|maximum|where|abs")


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
        shape = _shape(self.weight)
        return shape[1] if self.layout == "out_in" else shape[0]

    @property
    def out_features(self) -> int:
        shape = _shape(self.weight)
        return shape[0] if self.layout == "out_in" else shape[1]


@dataclasses.dataclass
class FFNMatch:
    """One plain FFN found in a graph: ``second(act(first(x)))``."""

    name: str
    first: LinearSpec
    second: LinearSpec
    activation: ActivationRule
    region: list[Node]
    pattern: str
    kind: str = "plain"

    @property
    def d_in(self) -> int:
        return self.first.in_features

    @property
    def d_hidden(self) -> int:
        return self.first.out_features

    @property
    def d_out(self) -> int:
        return self.second.out_features


@dataclasses.dataclass
class SkippedFFN:
    """An FFN-shaped pattern left untouched, with the reason."""

    name: str
    pattern: str
    reason: str


def find_ffns(gm: GraphModule, fqns: dict[Node, str]) -> tuple[list, list[SkippedFFN]]:
    """Find the FFNs in ``gm``, plain (``FFNMatch``) and gated (``GatedFFNMatch``, see
    find_gated_ffns.py); ``fqns`` maps parameter placeholders to their module FQNs.

    Returns the matches (graph order) and the FFN-shaped patterns that were declined.

    Example:
        >>> import torch
        >>> from tardis_compiler.backend import capture_graphs
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        >>> (gm, fqns), = capture_graphs(mlp, torch.randn(2, 8))
        >>> [m.name for m in find_ffns(gm, fqns)[0]]
        ['']
    """
    from .find_gated_ffns import find_gated_ffns  # it builds on this module's helpers

    matches, skipped = find_gated_ffns(gm, fqns)
    claimed: set[Node] = {n for m in matches for n in linear_nodes(m)}
    for node in gm.graph.nodes:
        first = as_linear(node, fqns)
        if first is None or first.node in claimed:
            continue
        result = _match_from(first, fqns)
        if result is None:
            continue
        if isinstance(result, SkippedFFN):
            skipped.append(result)
            continue
        claimed.update({result.first.node, result.second.node})
        matches.append(result)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    matches.sort(key=lambda m: order[linear_nodes(m)[-1]])
    _dedupe_names(matches, fqns)
    return matches, skipped


def linear_nodes(match) -> list[Node]:
    """The result nodes of an FFN match's linears, the output linear last."""
    if match.kind == "gated":
        return [match.gate.node, match.up.node, match.down.node]
    return [match.first.node, match.second.node]


def ffn_input(match) -> Node:
    """The node an FFN match reads its tokens from."""
    return match.gate.x if match.kind == "gated" else match.first.x


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
        if _is_param(weight, fqns) and _is_param(bias, fqns) and len(_shape(bias)) == 1:
            return LinearSpec(node, x, weight, bias, "in_out", "addmm")
        return None
    if node.target in (operator.matmul, torch.matmul) and len(node.args) == 2:
        x, w_expr = node.args
        weight, layout = _weight_through_transpose(w_expr, fqns)
        if weight is None:
            return None
        spec = LinearSpec(node, x, weight, None, layout, "matmul")
        bias_add = _single_user(node)
        if bias_add is not None and bias_add.target in (operator.add, operator.iadd, torch.add):
            other = [a for a in bias_add.args if a is not node]
            if len(other) == 1 and _is_param(other[0], fqns) and len(_shape(other[0])) == 1:
                spec.node, spec.bias = bias_add, other[0]
        return spec
    return None


def _match_from(first: LinearSpec, fqns: dict[Node, str]) -> FFNMatch | SkippedFFN | None:
    z = _follow_shape_only(first.node, first.out_features)
    region, exits = _elementwise_region(z)
    if not region or not any(_looks_nonlinear(n) for n in region):
        return None  # two linears in a row, or no activation at all: not an FFN
    name = _ffn_name(first, None, fqns)
    if len(exits) != 1:
        if not any(_feeds_linear(consumer, first.out_features, fqns) for _, consumer in exits):
            return None  # e.g. a norm's pow(2) right after a projection: not an activation
        return SkippedFFN(name, "linear -> ?", f"activation output is used {len(exits)} times; a plain FFN needs one")
    exit_node, consumer = exits[0]
    second_node = _follow_shape_only_to_consumer(consumer, first.out_features)
    second = as_linear(second_node, fqns) if second_node is not None else None
    if second is None:
        return None  # gated FFNs (act(g) * u) are find_gated_ffns' to match or decline  # e.g. a pooler's tanh feeding the output: not an FFN
    name = _ffn_name(first, second, fqns)
    pattern = f"{first.spelling} -> {{act}} -> {second.spelling}"
    if second.in_features != first.out_features:
        return SkippedFFN(name, pattern.format(act="?"), "hidden sizes of the two linears differ")
    if not _same_token_layout(first, second):
        return SkippedFFN(name, pattern.format(act="?"),
                          "views between the linears change the token layout; cannot fuse safely")
    rule, how = _identify(region, z, exit_node)
    if rule is None:
        return SkippedFFN(name, pattern.format(act=how),
                          "unrecognised activation: register it with tardis_compiler.register_activation_rule")
    return FFNMatch(name, first, second, rule, region, pattern.format(act=f"{rule.name} ({how})"))


def _feeds_linear(consumer: Node, last_dim: int, fqns: dict[Node, str]) -> bool:
    node = _follow_shape_only_to_consumer(consumer, last_dim)
    return node is not None and as_linear(node, fqns) is not None


def _follow_shape_only(node: Node, last_dim: int) -> Node:
    while True:
        nxt = _single_user(node)
        if nxt is None or not _is_shape_only(nxt) or not _static_eq(_last_dim(nxt), last_dim):
            return node
        node = nxt


def _follow_shape_only_to_consumer(node: Node, last_dim: int) -> Node | None:
    while _is_shape_only(node):
        if not _static_eq(_last_dim(node), last_dim):
            return None
        node = _single_user(node)
        if node is None:
            return None
    return node


def _elementwise_region(z: Node) -> tuple[list[Node], list[tuple[Node, Node]]]:
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


def _identify(region: list[Node], z: Node, out: Node) -> tuple[ActivationRule | None, str]:
    if len(region) == 1:
        for rule in activation_rules():
            if rule.matches_node(region[0]):
                return rule, "op"
    how = f"formula of {len(region)} ops" if len(region) > 1 else f"op {_target_name(region[0])}"

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


def _is_param(node, fqns: dict[Node, str]) -> bool:
    return isinstance(node, Node) and node in fqns


def _weight_through_transpose(node, fqns) -> tuple[Node | None, str]:
    if _is_param(node, fqns) and len(_shape(node)) == 2:
        return node, "in_out"
    if not isinstance(node, Node):
        return None, ""
    base = node.args[0] if node.args else None
    is_t = (
        (node.op == "call_function" and node.target is getattr and node.args[1] in ("T", "mT"))
        or (node.op == "call_method" and node.target == "t")
        or (node.op == "call_function" and node.target in (torch.t,))
        or (node.op in ("call_method", "call_function") and _target_name(node) == "transpose"
            and sorted(int(a) % 2 for a in node.args[1:3]) == [0, 1])
    )
    if is_t and _is_param(base, fqns) and len(_shape(base)) == 2:
        return base, "out_in"
    return None, ""


def _is_shape_only(node: Node) -> bool:
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
        return node.target in _POINTWISE_FUNCTIONS or _is_shape_only(node) and node.target is F.dropout
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


def _looks_nonlinear(node: Node) -> bool:
    return bool(_NONLINEAR_HINT.search(_target_name(node)))


def is_metadata_query(node: Node) -> bool:
    """``x.size()``, ``x.size(-1)``, ``x.dim()``...: reads the shape, not the values. Under dynamic
    shapes dynamo adds such users; they don't make a value "used" (and once the op is traced,
    sizes are symbolic expressions, so the nodes they hang on are dead code for inductor)."""
    if node.op == "call_method" and node.target in ("size", "dim", "numel", "stride"):
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "dtype", "device")


def _single_user(node: Node) -> Node | None:
    users = [u for u in node.users if not is_metadata_query(u)]
    return users[0] if len(users) == 1 else None


def _shape(node) -> tuple:
    value = node.meta.get("example_value") if isinstance(node, Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else ()


def _last_dim(node: Node):
    shape = _shape(node)
    return shape[-1] if shape else None


def _same_token_layout(first: LinearSpec, second: LinearSpec) -> bool:
    """The fused op maps x (..., d) to (..., d_out); it can replace ``second`` only if that has
    the same leading shape, or is the 2-D flattening of it (Conv1D's view(-1, d))."""
    # str() compares symbolic sizes (s0, s1) without evaluating them, so no guard is installed.
    lead_in = tuple(map(str, _shape(first.x)[:-1]))
    lead_out = tuple(map(str, _shape(second.node)[:-1]))
    return lead_in == lead_out or len(lead_out) == 1


def _static_eq(a, b) -> bool:
    """Equality of sizes that never specialises a SymInt (a symbolic size is never a hidden size)."""
    return isinstance(a, int) and isinstance(b, int) and a == b


def _target_name(node: Node) -> str:
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


def _module_of(fqn: str) -> str:
    return fqn.rsplit(".", 1)[0] if "." in fqn else ""


def _ffn_name(first: LinearSpec, second: LinearSpec | None, fqns: dict[Node, str]) -> str:
    a = _module_of(fqns[first.weight]).split(".")
    if second is None:
        return ".".join(a)
    b = _module_of(fqns[second.weight]).split(".")
    common = []
    for x, y in zip(a, b):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _dedupe_names(matches: list[FFNMatch], fqns: dict[Node, str]) -> None:
    # Two FFNs under one module (rare) are named by their first linear's module instead. FFNs that
    # still share a name (weights tied between layers: one parameter, one FQN) are told apart by
    # their graph order, "name#1", "name#2", ..., so each is calibrated with its own inputs and biases.
    counts: dict[str, int] = {}
    for m in matches:
        counts[m.name] = counts.get(m.name, 0) + 1
    for m in matches:
        if counts[m.name] > 1:
            m.name = _module_of(fqns[(m.gate if m.kind == "gated" else m.first).weight])
    seen: dict[str, int] = {}
    for m in matches:
        k = seen.get(m.name, 0)
        seen[m.name] = k + 1
        if k:
            m.name = f"{m.name}#{k}"
