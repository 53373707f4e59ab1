"""Rewrite by module swap: ``compress_(model, profile)``, the explicit in-place verb.

The second front door to the runtime (the first is the backend's graph rewrite, ``passes/fold_ffns.py``).
It finds the FFNs the same way, in the dynamo graph of one example call, builds each one's pack
from the model's weights and the profile (``runtime/pack.py``), and swaps the modules for a
``runtime/module.TardisFFN`` holding only that pack. Two swaps cover the architectures we support:

- ``"module"``: the module the FFN's linears share computes exactly the FFN (``LlamaMLP``,
  ``GPT2MLP``, ``FalconMLP``...; checked numerically on random inputs): it is replaced whole;
- ``"split"`` (plain FFNs whose linears live in different modules, or beside attention: BERT, OPT,
  BLOOM): the first linear becomes the ``TardisFFN`` (its output is then the FFN's output), the
  activation module and the second linear become ``nn.Identity``.

An FFN neither swap fits is left dense, with the reason in the returned report; so are the weights
no FFN match covers (routed MoE experts, ``moe.routed_experts``), listed as not considered. The
guarded neurons' rows are kept as int8 by default (``bundles="int8"``: they are read only on the tokens
their guard flags, and int8 halves what bfloat16 holds and quarters float32); the always-exact ones
stay in the model's dtype (calibration priced them so: ``CalibrationConfig.bundles``). With
``guard="all"`` every neuron keeps its rows as they are, and the
model computes what the dense one does (the exactness check; it holds all the weights, so it saves
no memory); ``bundles="dense"`` keeps the guarded rows exact too.

``other_linears="int8"`` or ``"int4"`` then quantizes, weight-only, every ``nn.Linear`` left outside a
compressed FFN (attention projections, the LM head, dense FFNs' linears: ``compress_linears.py``).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import re
from typing import Any, Iterable, Iterator

import torch

from .activations import get_activation_rule
from .compress_linears import QuantizedLinearEntry, quantize_other_linears
from .config import GUARDS, check_patterns, require
from .moe import routed_experts
from .passes import capture_graphs, find_ffns
from .passes.context import ffn_slots
from .passes.ffn_graph import module_of
from .plan import PlanRequest, plan_ffn
from .profile import Profile
from .runtime.ffn_kind import ffn_kind
from .runtime.layout import BUNDLE_ENCODINGS
from .runtime.module import TardisFFN
from .runtime.pack import dense_reference
from .runtime.quantized_linear import OTHER_LINEARS

log = logging.getLogger("tardis_compiler")


@dataclasses.dataclass
class CompressedFFN:
    """What ``compress_`` did with one FFN: ``mode`` "module" / "split", or "dense" with ``reason``."""

    name: str
    mode: str
    target: str = ""  # the module now holding the TardisFFN
    identities: tuple[str, ...] = ()  # modules now nn.Identity ("split")
    dense_bytes: int = 0  # the FFN's weight bytes before
    resident_bytes: int = 0  # what its TardisFFN holds
    read_bytes: float = 0.0  # bytes read per token, at the flag rate measured in calibration
    reason: str = ""
    guard: str = ""
    bundles: str = ""  # how the guarded neurons' rows are held: "int8" or "dense"
    measured: dict = dataclasses.field(default_factory=dict)  # calibration's held-out stats for ``guard``

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON: a checkpoint's config keeps it for ``tardis explain DIR``)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CompressReport:
    """``compress_``'s result, one ``CompressedFFN`` per FFN found, with the memory totals, and
    ``not_considered``: (module FQN, reason) of weights no FFN match covers (routed MoE experts),
    which stay dense and are not in the totals. ``linears``: with ``other_linears``, one
    ``QuantizedLinearEntry`` per other ``nn.Linear`` (quantized, or dense with a reason); ``totals()``
    counts the compressed FFNs and the quantized linears together."""

    ffns: list[CompressedFFN]
    guard: str | None
    seconds: float = 0.0  # set by callers that time the whole compression (``tardis compress``)
    not_considered: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    linears: list[QuantizedLinearEntry] = dataclasses.field(default_factory=list)
    other_linears: str | None = None

    @property
    def compressed(self) -> list[CompressedFFN]:
        return [f for f in self.ffns if f.mode != "dense"]

    @property
    def bundles(self) -> str:
        """How the compressed FFNs hold their guarded rows: "int8", "dense", or "mixed"."""
        kinds = {f.bundles for f in self.compressed}
        return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "")

    @property
    def quantized(self) -> list[QuantizedLinearEntry]:
        """The linears ``other_linears`` quantized."""
        return [q for q in self.linears if q.dtype != "dense"]

    def totals(self) -> dict[str, float]:
        """Bytes before -> after over everything ``compress_`` replaced (compressed FFNs and quantized
        linears): ``held_before`` / ``held_after`` (a tied linear frees nothing: its dense weight stays
        with the parameter it shares) and ``read_before`` / ``read_after`` per token."""
        ffns, lins = self.compressed, self.quantized
        return {"held_before": sum(f.dense_bytes for f in ffns) + sum(q.held_before for q in lins),
                "held_after": sum(f.resident_bytes for f in ffns) + sum(q.resident_bytes for q in lins),
                "read_before": sum(f.dense_bytes for f in ffns) + sum(q.dense_bytes for q in lins),
                "read_after": sum(f.read_bytes for f in ffns) + sum(q.resident_bytes for q in lins)}

    def resident_fraction(self) -> float:
        """Resident bytes of the compressed FFNs over their dense weight bytes."""
        dense = sum(f.dense_bytes for f in self.compressed)
        return sum(f.resident_bytes for f in self.compressed) / dense if dense else 1.0

    def read_fraction(self) -> float:
        """Bytes read per token over the dense bytes (the compressed FFNs)."""
        dense = sum(f.dense_bytes for f in self.compressed)
        return sum(f.read_bytes for f in self.compressed) / dense if dense else 1.0

    def __str__(self) -> str:
        lines = [f"{'FFN':<34} {'swap':<7} {'dense MB':>9} {'held MB':>8} {'read MB':>8}  note"]
        for f in self.ffns:
            lines.append(f"{f.name:<34} {f.mode:<7} {f.dense_bytes / 1e6:>9.3f} {f.resident_bytes / 1e6:>8.3f} "
                         f"{f.read_bytes / 1e6:>8.3f}  {f.reason}")
        lines.extend(f"not considered: {name or '<root>'} ({reason})" for name, reason in self.not_considered)
        summary = (f"compressed {len(self.compressed)}/{len(self.ffns)} FFNs found: held {self.resident_fraction():.3f} "
                   f"of their dense bytes, read {self.read_fraction():.3f} per token")
        if self.not_considered:
            n = len(self.not_considered)
            kinds = ", ".join(dict.fromkeys(reason.split(":")[0] for _, reason in self.not_considered))
            summary += f"; {n} module{'s' * (n > 1)} not considered ({kinds}: they stay dense)"
        lines.append(summary)
        if self.other_linears:
            lines.extend(self._linear_lines())
        return "\n".join(lines)

    def _linear_lines(self) -> list[str]:
        done, mb = self.quantized, 1e6
        before, after = sum(q.dense_bytes for q in done), sum(q.resident_bytes for q in done)
        lines = [f"other linears: {len(done)}/{len(self.linears)} quantized to {self.other_linears} "
                 f"(attention, LM head, dense FFNs' linears): {before / mb:.3f} -> {after / mb:.3f} MB read per token"]
        lines.extend(f"  {q.name}: tied to {q.tied_to}, which keeps the dense weight: held "
                     f"+{q.resident_bytes / mb:.3f} MB (skip=[name] keeps it dense and tied)" for q in done if q.tied_to)
        reasons: dict[str, list[str]] = {}
        for q in self.linears:
            if q.dtype == "dense":
                reasons.setdefault(q.reason, []).append(q.name)
        lines.extend(f"  left dense: {len(names)} ({reason}), e.g. {names[0]}" for reason, names in reasons.items())
        t = self.totals()
        lines.append(f"compress_ in all: held {t['held_before'] / mb:.3f} -> {t['held_after'] / mb:.3f} MB, "
                     f"read {t['read_before'] / mb:.3f} -> {t['read_after'] / mb:.3f} MB per token")
        return lines


def compress_(model: torch.nn.Module, profile: Profile | str | os.PathLike, example_inputs: Any = None,
              guard: str | None = None, skip: Iterable[str] = (), bundles: str | None = None,
              other_linears: str | None = None, keep_dense: bool = False,
              dense_above: int | str = "auto") -> CompressReport:
    """Replace, in place, each FFN of ``model`` that ``profile`` calibrated by a ``TardisFFN``
    holding only its pack (see the module docstring). Returns a ``CompressReport``.

    ``example_inputs``: one call's inputs (a tensor, a tuple of arguments or a dict of keyword
    arguments) to find the FFNs with; None takes a Hugging Face model's ``dummy_inputs``.
    ``guard``: the guard to run (None: the profile's per FFN kind, ``DEFAULT_GUARDS``); "all" is
    the exactness test mode. ``skip``: FFN names or regexes to leave dense. ``bundles``: how the
    guarded neurons' rows are held, "int8" or "dense" (exact; more memory); None (default): what the
    profile priced for each FFN (``FFNProfile.bundles``: ``CalibrationConfig.bundles`` for fits to a budget).
    ``other_linears``: "int8" or "int4" also quantizes, weight-only, every ``nn.Linear`` outside the
    compressed FFNs (attention, the LM head, FFNs left dense; ``skip`` patterns keep a linear, or the
    modules under a name, dense; see ``compress_linears.py`` for tied heads); None (default): they stay.
    ``dense_above``: calls of more than this many tokens (prefill, batches) leave the guarded paths
    ("auto", the default, kept as such in the checkpoint: where dense measured faster for the dtype and
    the threads of the process running it, ``ffn_op.DENSE_ABOVE``; an int; -1 never): a pack whose
    bundles are in the model's dtype (``bundles="dense"``) then runs every bundled neuron exactly, at
    about the dense FFN's cost; int8 bundles keep the guarded paths. ``keep_dense``: each ``TardisFFN``
    also keeps its FFN's own linears and runs those calls through them, whatever its bundles: batches
    and prefill then cost what dense costs, and the model holds the dense FFN weights *and* the packs
    (more than dense). Off by default: memory is the point. Perplexity through ``tardis_compiler.eval``
    measures the guarded paths on every token either way (``ffn_op.every_token_through_packs``).

    Example:
        >>> import torch, tardis_compiler as tc
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
        >>> profile = tc.calibrate(mlp, [torch.randn(256, 16)], tc.CalibrationConfig(progress=False))
        >>> report = tc.compress_(mlp, profile, torch.randn(2, 16))
        >>> type(mlp[0]).__name__, type(mlp[2]).__name__, report.ffns[0].mode
        ('TardisFFN', 'Identity', 'split')
    """
    if isinstance(profile, (str, os.PathLike)):
        profile = Profile.load(profile)
    require(isinstance(profile, Profile), f"profile must be a Profile or a saved profile's path, got "
            f"{type(profile).__name__}")
    require(guard is None or guard in GUARDS, f"guard must be one of {GUARDS} or None, got {guard!r}")
    require(bundles is None or bundles in BUNDLE_ENCODINGS,
            f"bundles must be one of {sorted(BUNDLE_ENCODINGS)} or None, got {bundles!r}")
    require(other_linears is None or other_linears in OTHER_LINEARS,
            f"other_linears must be one of {sorted(OTHER_LINEARS)} or None, got {other_linears!r}")
    require(isinstance(keep_dense, bool), f"keep_dense must be True or False, got {keep_dense!r}")
    require(dense_above == "auto" or (isinstance(dense_above, int) and not isinstance(dense_above, bool)
                                      and dense_above >= -1),
            f"dense_above must be 'auto' or an integer >= -1 (-1: never), got {dense_above!r}")
    if model.training:
        raise ValueError("compress_() needs the model in eval mode (folding is an inference transform): "
                         "call model.eval() first")
    skip = check_patterns(skip if isinstance(skip, (str, list)) else tuple(skip), "skip")
    request = PlanRequest(guard=guard, skip=skip, calibration=profile.config, bundles=bundles, door="module")
    done: dict[str, CompressedFFN] = {}
    for match, fqns, graph_inputs in model_ffns(model, example_inputs):
        done[match.name] = _compress_one(model, match, fqns, graph_inputs, profile, request, keep_dense,
                                         dense_above)
    not_considered = routed_experts(model, list(done))  # after matching: what no found FFN covers
    if not done:
        beside = f" (not considered: {not_considered[0][0]}, {not_considered[0][1]})" if not_considered else ""
        raise ValueError(f"compress_() found no FFN in this model{beside}; tardis_compiler.explain(model, inputs) "
                         "lists what was matched and why patterns were skipped")
    report = CompressReport(list(done.values()), guard, not_considered=not_considered, other_linears=other_linears)
    if other_linears is not None:
        report.linears = quantize_other_linears(model, other_linears, skip, not_considered)
    _mark_compressed(model, report, profile)
    log.info("compress_:\n%s", report)
    return report


def model_ffns(model: torch.nn.Module, example_inputs: Any) -> Iterator[tuple[Any, dict, tuple[dict, list]]]:
    """Each FFN of ``model`` once, as found in the dynamo graphs of one call on ``example_inputs``
    (as for ``compress_``): (match, the graph's placeholder -> FQN map, (placeholder -> input position,
    the model's tensors in that order): what ``ffn_slots(match, positions).weights(values)`` views).
    The one FFN discovery of ``compress_`` and ``quantized_reference``.

    Example:
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
        >>> [match.kind for match, _, _ in model_ffns(mlp, torch.randn(2, 16))]
        ['plain']
    """
    args, kwargs = _example_call(model, example_inputs)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    seen: set[str] = set()
    for gm, fqns in capture_graphs(model, *args, **kwargs):
        matches, _ = find_ffns(gm, fqns)
        placeholders = list(fqns)  # the graph's state inputs, as the model's tensors (ffn_slots' values)
        graph_inputs = ({node: i for i, node in enumerate(placeholders)}, [tensors[fqns[n]] for n in placeholders])
        for match in matches:
            if match.name not in seen:
                seen.add(match.name)
                yield match, fqns, graph_inputs


def _compress_one(model, match, fqns, graph_inputs, profile: Profile, request: PlanRequest, keep_dense: bool,
                  dense_above: int | str) -> CompressedFFN:
    plan = plan_ffn(match, request).calibrated(profile.ffns.get(match.name))
    entry = CompressedFFN(match.name, "dense", reason=plan.reason)
    positions, values = graph_inputs
    slots = ffn_slots(match, positions)
    weights = slots.weights(values)
    entry.dense_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in slots.tensors(values)
                                                                   if t is not None}.values())
    if not plan.rewritten:
        return entry
    swap = _plan_swap(model, match, fqns, weights)
    if isinstance(swap, str):
        entry.reason = swap
        return entry
    pack = plan.build(weights)
    entry.mode, entry.target, entry.identities = swap
    first_linear = module_of(fqns[match.linears[0].weight])
    dense = None
    if keep_dense:  # the FFN's linears in nn.Linear layout, the kind's order
        spec = ffn_kind(match.kind)
        dense = [t for row, bias in zip(spec.rows, spec.biases)
                 for t in ((weights[row].t() if row == spec.out_row else weights[row]), weights[bias])]
    module = TardisFFN.from_pack(match.name, pack, dense_key=first_linear[len(entry.target):].lstrip("."),
                                 dense=dense, dense_above=dense_above)
    entry.resident_bytes = module.resident_bytes()
    entry.guard, entry.bundles = plan.guard, pack.layout.bundles
    entry.measured = plan.measured()
    row = plan.row(weights)
    entry.read_bytes = plan.read_bytes(row.elem_bytes, row.has_bias, entry.dense_bytes)
    model.set_submodule(entry.target, module)
    for fqn in entry.identities:
        model.set_submodule(fqn, torch.nn.Identity())
    return entry


def _plan_swap(model, match, fqns, weights) -> tuple[str, str, tuple[str, ...]] | str:
    """("module" | "split", target, identities), or the reason neither swap fits."""
    owners = [module_of(fqns[spec.weight]) for spec in match.linears]
    parent = match.name
    if parent and _computes_ffn(model.get_submodule(parent), match, weights):
        return "module", parent, ()
    if not ffn_kind(match.kind).splittable:
        return f"no module computes exactly this {match.kind} FFN (its linears: {owners}): left dense"
    act = _activation_module(match)
    if act is None or act in owners:
        return "the activation is not a module of its own, so the FFN cannot be split across modules: left dense"
    try:
        act_module = model.get_submodule(act)
    except AttributeError:
        return f"activation module {act!r} not found in the model: left dense"
    if any(True for _ in act_module.parameters()):
        return f"activation module {act!r} has parameters: left dense"
    return "split", owners[0], (act, owners[-1])


def _computes_ffn(module: torch.nn.Module, match, weights) -> bool:
    """Whether ``module(x)`` is the FFN alone, on random x (nothing else in its forward)."""
    try:
        required = [p for p in inspect.signature(module.forward).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    if len(required) != 1:
        return False
    first = weights[ffn_kind(match.kind).first_row]
    x = torch.randn(2, 3, match.d_in, generator=torch.Generator().manual_seed(0)).to(first.dtype)
    try:
        with torch.no_grad():
            got = module(x)
            want = dense_reference(match.kind, weights, get_activation_rule(match.activation.name).fn, x)
    except Exception:  # noqa: BLE001 - any module that cannot take one tensor is not the FFN alone
        return False
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return False
    scale = want.float().norm().clamp(min=1e-30)
    return bool(((got.float() - want.float()).norm() / scale) < 1e-2)


_STACK_PREFIX = re.compile(r"^L\['[^']*'\](?:\[\d+\])?\.?")


def _activation_module(match) -> str | None:
    """The FQN of the module whose forward is the activation (every node between the linears
    attributed to it), from dynamo's ``nn_module_stack``; None if there is no such module."""
    owners = set()
    for node in match.region:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            return None
        path, _cls = list(stack.values())[-1]
        owners.add(_STACK_PREFIX.sub("", path))
    return owners.pop() if len(owners) == 1 else None


def _example_call(model: torch.nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is None:
        dummy = getattr(model, "dummy_inputs", None)
        if not isinstance(dummy, dict):
            raise ValueError("compress_() runs the model once to find its FFNs: pass example_inputs (a tensor, a "
                             "tuple of arguments or a dict of keyword arguments, e.g. a tokenized sentence)")
        return (), dict(dummy)
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def _mark_compressed(model: torch.nn.Module, report: CompressReport, profile: Profile) -> None:
    """Record the swaps on the model (what a checkpoint needs to rebuild it: ``hf/``)."""
    swaps = dict(getattr(model, "tardis_swaps", {}) or {})
    for f in report.compressed:
        swaps[f.target] = {"ffn": model.get_submodule(f.target).spec(), "mode": f.mode,
                           "identities": list(f.identities), "compressed": f.to_dict()}
    model.tardis_swaps = swaps
    linears = dict(getattr(model, "tardis_linears", {}) or {})
    for q in report.quantized:
        linears[q.name] = {"linear": model.get_submodule(q.name).spec(), "compressed": q.to_dict()}
    model.tardis_linears = linears
    try:
        from .hf.quantizer import attach_quantization_config
    except ImportError:  # transformers is not installed: nothing to attach
        return
    attach_quantization_config(model, report, profile)


def compressed_bytes(model: torch.nn.Module) -> tuple[float, int, int] | None:
    """(bytes read per token, bytes held, dense bytes) of the FFNs ``compress_`` swapped in ``model``
    (or a checkpoint rebuilt them), as recorded when they were compressed; None if there are none.

    Example:
        >>> compressed_bytes(torch.nn.Linear(2, 2)) is None
        True
    """
    swaps = getattr(model, "tardis_swaps", None)
    if not swaps:
        return None
    done = [swap.get("compressed", {}) for swap in swaps.values()]
    return (sum(d.get("read_bytes", 0.0) for d in done), sum(d.get("resident_bytes", 0) for d in done),
            sum(d.get("dense_bytes", 0) for d in done))
