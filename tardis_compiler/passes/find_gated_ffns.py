"""Match: find every *gated* FFN ``down(act(gate(x)) * up(x))`` in a dynamo FX graph.

Same "anchor and walk" as :mod:`.find_plain_ffns`, on the graph vocabulary both share
(:mod:`.ffn_graph`: linear spellings, shape-only following, the elementwise region, numeric
identification of the activation). For every linear whose weight is a model parameter, taken as
a candidate *gate*:

1. walk down through shape-only ops to the activation input z; if the linear's output is instead
   ``.chunk(2, dim=-1)``-ed (Phi-3's fused ``gate_up_proj``), each half is a candidate z;
2. grow the elementwise region fed by z alone; its one exit must be a ``mul`` (any operand order,
   ``*``, ``torch.mul``, ``Tensor.mul``) whose other operand is, through shape-only ops, a
   parameter-fed linear ``up`` on the same input x (or the other half of the same fused linear);
3. the product must feed, through shape-only ops, exactly one parameter-fed linear ``down``;
4. the region is identified against the activation registry (op target, else numerically).

A pattern that is clearly gated (activated linear times a linear on the same input) but fails a
later check is reported as a :class:`SkippedFFN` with the reason and left untouched. Shapes are
compared without evaluating symbolic sizes, so dynamic-shape graphs are never specialised.
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch.fx import GraphModule, Node

from ..activations import ActivationRule
from .ffn_graph import (LinearSpec, SkippedFFN, as_linear, elementwise_region, identify_region, is_metadata_query,
                        is_shape_only, last_dim_of, module_of, same_token_layout, shape_of, single_user, static_eq,
                        target_name)

_MUL_FUNCTIONS = (operator.mul, torch.mul)
_MUL_METHODS = ("mul", "__mul__")
_SPLIT_FUNCTIONS = (torch.chunk, torch.split)
_SPLIT_METHODS = ("chunk", "split")


@dataclasses.dataclass
class GatedFFNMatch:
    """One gated FFN: down(act(gate(x)) * up(x)).

    ``up`` is the same :class:`LinearSpec` object as ``gate`` when one fused linear computes both;
    the offsets then say where each half's neurons start (rows of an ``nn.Linear`` weight).
    """

    name: str
    gate: LinearSpec
    up: LinearSpec
    down: LinearSpec
    activation: ActivationRule
    region: list[Node]
    pattern: str
    gate_offset: int = 0
    up_offset: int = 0
    kind: str = "gated"

    @property
    def linears(self) -> tuple[LinearSpec, ...]:
        """The FFN's linears in its kind's order (``runtime/ffn_kind.py``), the output linear last."""
        return (self.gate, self.up, self.down)

    @property
    def offsets(self) -> tuple[int | None, ...]:
        """Row offsets of the input linears' neurons in their (possibly fused) weights."""
        return (self.gate_offset, self.up_offset)

    @property
    def fused(self) -> bool:
        """True when gate and up are halves of one linear."""
        return self.gate is self.up

    @property
    def d_in(self) -> int:
        return self.gate.in_features

    @property
    def d_hidden(self) -> int:
        """Number of gated neurons m (half of a fused gate_up linear's outputs)."""
        return self.down.in_features

    @property
    def d_out(self) -> int:
        return self.down.out_features


def find_gated_ffns(gm: GraphModule, fqns: dict[Node, str]) -> tuple[list[GatedFFNMatch], list[SkippedFFN]]:
    """Find gated FFNs (graph order); declined gated-looking patterns come back as SkippedFFN with a clear reason.

    ``fqns`` maps parameter placeholders to their FQNs (``passes.placeholder_fqns(gm)``).

    Example:
        >>> import torch
        >>> from tardis_compiler.passes import capture_graphs
        >>> gate, up, down = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        >>> swiglu = lambda x: down(torch.nn.functional.silu(gate(x)) * up(x))
        >>> (gm, fqns), = capture_graphs(swiglu, torch.randn(2, 8))
        >>> (match,), skipped = find_gated_ffns(gm, fqns)
        >>> match.activation.name, (match.d_in, match.d_hidden, match.d_out), skipped
        ('silu', (8, 16, 8), [])
        >>> match.pattern
        'linear -> silu (op) * linear -> linear'
        >>> torch.compiler.reset()  # forget the compiled example
    """
    linears = {}
    for node in gm.graph.nodes:
        spec = as_linear(node, fqns)
        if spec is not None:
            linears.setdefault(spec.node, spec)  # keyed by the result node (the bias add for x @ W.T + b)
    matches: list[GatedFFNMatch] = []
    skipped: list[SkippedFFN] = []
    claimed: set[Node] = set()
    for spec in list(linears.values()):
        if spec.node in claimed:
            continue
        result = _match_from(spec, linears, fqns)
        if result is None:
            continue
        if isinstance(result, SkippedFFN):
            skipped.append(result)
            continue
        claimed.update({result.gate.node, result.up.node, result.down.node})
        matches.append(result)
    _dedupe_names(matches, fqns)
    return matches, skipped


# --- one candidate gate linear -------------------------------------------------------------------


@dataclasses.dataclass
class _Gate:
    """A candidate gate: activation input z, its region, and the product it exits into."""

    z: Node
    region: list[Node]
    exits: list[tuple[Node, Node]]
    exit_node: Node
    mul: Node
    other: Node  # the product's other operand


def _match_from(spec: LinearSpec, linears: dict[Node, LinearSpec],
                fqns: dict[Node, str]) -> GatedFFNMatch | SkippedFFN | None:
    out = _follow_shape_only(spec.node, spec.out_features)
    splitter = single_user(out)
    if splitter is not None and _is_split(splitter) and splitter.args and splitter.args[0] is out:
        return _match_fused(spec, out, splitter, fqns)
    gate = _gate_at(out)
    if gate is None:
        return None
    up_node = _back_through_shape_only(gate.other, spec.out_features)
    up = linears.get(up_node)
    if up is None or up is spec:
        return None  # not an FFN gate (e.g. attention output times a gate): none of our business
    name = _common_name((spec, up), fqns)
    pattern = f"{spec.spelling} -> {{act}} * {up.spelling} -> {{down}}"
    if up.out_features != spec.out_features:
        return SkippedFFN(name, pattern.format(act="?", down="?"),
                          f"hidden sizes disagree: gate has {spec.out_features} outputs, up has {up.out_features}")
    if _input_root(spec.x, spec.in_features) is not _input_root(up.x, up.in_features):
        return SkippedFFN(name, pattern.format(act="?", down="?"),
                          "the gate and up projections read different inputs; a gated FFN reads one x")
    uses = _chain_uses(up.node, gate.other)
    if uses != 1:
        return SkippedFFN(name, pattern.format(act="?", down="?"),
                          f"up projection output is used {uses} times; a gated FFN needs one (the product)")
    return _finish(spec, up, gate, spec.out_features, 0, 0, pattern, fqns)


def _match_fused(spec: LinearSpec, out: Node, splitter: Node,
                 fqns: dict[Node, str]) -> GatedFFNMatch | SkippedFFN | None:
    pieces: dict[int, list[Node]] = {}
    for user in splitter.users:
        if user.op == "call_function" and user.target is operator.getitem and isinstance(user.args[1], int):
            pieces.setdefault(user.args[1], []).append(user)
    # Which piece is the gate: its activation's product reads another piece of the same split.
    found = None
    for index in sorted(pieces):
        for piece in pieces[index]:
            last = last_dim_of(piece)
            gate = _gate_at(_follow_shape_only(piece, last)) if isinstance(last, int) else None
            if gate is None:
                continue
            other = _back_through_shape_only(gate.other, last)
            partner = [i for i, ps in pieces.items() if other in ps and other is not piece]
            if partner:
                found = (index, partner[0], gate, other)
                break
        if found:
            break
    if found is None:
        return None
    gate_index, up_index, gate, up_piece = found
    name = _ffn_module(spec, fqns)
    split_name = target_name(splitter)
    pattern = f"fused {spec.spelling} -> {split_name} -> {{act}} * . -> {{down}}"
    halves = _halves(splitter, out, spec.out_features)
    if halves is None:
        return SkippedFFN(name, pattern.format(act="?", down="?"),
                          f"the fused gate/up projection is split by {_describe_split(splitter)}; only 2 equal "
                          "halves along the last dim (.chunk(2, dim=-1)) are supported")
    m = halves
    for index, ps in pieces.items():
        if len(ps) != 1:
            return SkippedFFN(name, pattern.format(act="?", down="?"),
                              f"half {index} of the fused gate/up projection is taken {len(ps)} times")
    extra = [u for u in splitter.users if not (u.target is operator.getitem) and not is_metadata_query(u)]
    if extra:
        return SkippedFFN(name, pattern.format(act="?", down="?"),
                          "the split of the fused gate/up projection is used as a whole")
    uses = _chain_uses(up_piece, gate.other)
    if uses != 1:
        return SkippedFFN(name, pattern.format(act="?", down="?"),
                          f"the up half is used {uses} times; a gated FFN needs one (the product)")
    gate_offset, up_offset = (0, m) if gate_index < up_index else (m, 0)
    if gate_offset:
        pattern += " (up half first)"
    return _finish(spec, spec, gate, m, gate_offset, up_offset, pattern, fqns)


def _finish(gate_spec: LinearSpec, up_spec: LinearSpec, gate: _Gate, m: int, gate_offset: int, up_offset: int,
            pattern: str, fqns: dict[Node, str]) -> GatedFFNMatch | SkippedFFN:
    """Checks shared by the separate and fused spellings, from the product on."""
    name = _common_name((gate_spec, up_spec), fqns)
    if len(gate.exits) != 1:
        return SkippedFFN(name, pattern.format(act="?", down="?"),
                          f"gate activation output is used {len(gate.exits)} times; a gated FFN needs one "
                          "(the product)")
    if tuple(map(str, shape_of(gate.exit_node))) != tuple(map(str, shape_of(gate.other))):
        return SkippedFFN(name, pattern.format(act="?", down="?"),
                          "the product broadcasts (its operands have different shapes)")
    users = [u for u in gate.mul.users if not is_metadata_query(u)]
    if len(users) != 1:
        return SkippedFFN(name, pattern.format(act="?", down="?"),
                          f"the product act(gate) * up is used {len(users)} times; a gated FFN needs one (down)")
    prev, consumer = _forward_through_shape_only(gate.mul, users[0], m)
    down = as_linear(consumer, fqns) if consumer is not None else None
    if down is None or down.x is not prev:
        return SkippedFFN(name, pattern.format(act="?", down="?"),
                          "the product act(gate) * up does not feed a linear layer with parameter weights")
    name = _common_name((gate_spec, up_spec, down), fqns)
    pattern = pattern.replace("{down}", down.spelling)
    if down.in_features != m:
        return SkippedFFN(name, pattern.format(act="?"),
                          f"hidden sizes disagree: {m} gated neurons, down projection reads {down.in_features}")
    if not same_token_layout(gate_spec, down):
        return SkippedFFN(name, pattern.format(act="?"),
                          "views between the linears change the token layout; cannot fuse safely")
    rule, how = identify_region(gate.region, gate.z, gate.exit_node)
    if rule is None:
        return SkippedFFN(name, pattern.format(act=how),
                          "unrecognised gate activation: register it with tardis_compiler.register_activation_rule")
    return GatedFFNMatch(name, gate_spec, up_spec, down, rule, gate.region, pattern.format(act=f"{rule.name} ({how})"),
                         gate_offset=gate_offset, up_offset=up_offset)


def _gate_at(z: Node) -> _Gate | None:
    """z's elementwise region, if non-empty and one of its exits is a product with an outside tensor."""
    region, exits = elementwise_region(z)
    if not region:
        return None  # a bare linear times something: bilinear, not an activation gate
    inside = {z, *region}
    for exit_node, user in exits:
        if not _is_tensor_mul(user):
            continue
        others = [a for a in user.args[:2] if isinstance(a, Node) and a not in inside]
        if len(others) == 1:
            return _Gate(z, region, exits, exit_node, user, others[0])
    return None


# --- small graph helpers -------------------------------------------------------------------------


def _is_tensor_mul(node: Node) -> bool:
    if not ((node.op == "call_function" and node.target in _MUL_FUNCTIONS)
            or (node.op == "call_method" and node.target in _MUL_METHODS)):
        return False
    return len(node.args) == 2 and all(isinstance(a, Node) and isinstance(a.meta.get("example_value"), torch.Tensor)
                                       for a in node.args)


def _is_split(node: Node) -> bool:
    return ((node.op == "call_function" and node.target in _SPLIT_FUNCTIONS)
            or (node.op == "call_method" and node.target in _SPLIT_METHODS))


def _split_args(node: Node):
    """(sections, dim) of a chunk/split node: sections is an int count for chunk, else split sizes."""
    args = list(node.args[1:])
    size_key = "chunks" if target_name(node) == "chunk" else "split_size_or_sections"
    sections = args[0] if args else node.kwargs.get(size_key, node.kwargs.get("split_size"))
    dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
    return sections, dim


def _halves(node: Node, tensor: Node, total: int) -> int | None:
    """m if ``node`` splits ``tensor`` (last dim ``total``) into 2 equal halves along the last dim."""
    sections, dim = _split_args(node)
    ndim = len(shape_of(tensor))
    if not isinstance(dim, int) or ndim == 0 or dim % ndim != ndim - 1 or total % 2:
        return None
    m = total // 2
    if target_name(node) == "chunk":
        return m if sections == 2 else None
    if isinstance(sections, int):
        return m if sections == m else None
    if isinstance(sections, (list, tuple)) and len(sections) == 2 and all(static_eq(s, m) for s in sections):
        return m
    return None


def _describe_split(node: Node) -> str:
    sections, dim = _split_args(node)
    return f"{target_name(node)}({sections}, dim={dim})"


def _follow_shape_only(node: Node, last_dim: int) -> Node:
    while True:
        nxt = single_user(node)
        if (nxt is None or not is_shape_only(nxt) or nxt.args[0] is not node
                or not static_eq(last_dim_of(nxt), last_dim)):
            return node
        node = nxt


def _back_through_shape_only(node: Node, last_dim) -> Node:
    while (is_shape_only(node) and node.args and isinstance(node.args[0], Node)
           and static_eq(last_dim_of(node.args[0]), last_dim)):
        node = node.args[0]
    return node


def _input_root(x, d_in: int):
    """The node a linear's input is a view of (two views of one x are the same input)."""
    return _back_through_shape_only(x, d_in) if isinstance(x, Node) else x


def _chain_uses(start: Node, end: Node) -> int:
    """Uses of ``start``'s value on the shape-only chain to ``end`` (1 when nothing else reads it)."""
    node = start
    while node is not end:
        users = [u for u in node.users if not is_metadata_query(u)]
        if len(users) != 1:
            return len(users)
        node = users[0]
    return 1


def _forward_through_shape_only(prev: Node, node: Node, last_dim: int) -> tuple[Node, Node | None]:
    """From ``node`` (a user of ``prev``), skip shape-only ops; return (input of the consumer, consumer)."""
    while is_shape_only(node):
        if node.args[0] is not prev or not static_eq(last_dim_of(node), last_dim):
            return prev, None
        nxt = single_user(node)
        if nxt is None:
            return node, None
        prev, node = node, nxt
    return prev, node


def _ffn_module(spec: LinearSpec, fqns: dict[Node, str]) -> str:
    return module_of(fqns[spec.weight])


def _common_name(specs, fqns: dict[Node, str]) -> str:
    """The module FQN prefix common to the linears' weights (``model.layers.0.mlp``)."""
    paths = [module_of(fqns[s.weight]).split(".") for s in specs]
    common = []
    for parts in zip(*paths):
        if any(p != parts[0] for p in parts):
            break
        common.append(parts[0])
    return ".".join(common)


def _dedupe_names(matches: list[GatedFFNMatch], fqns: dict[Node, str]) -> None:
    # Two gated FFNs under one module (rare) are named by their gate linear's module instead.
    counts: dict[str, int] = {}
    for m in matches:
        counts[m.name] = counts.get(m.name, 0) + 1
    for m in matches:
        if counts[m.name] > 1:
            m.name = module_of(fqns[m.gate.weight])
