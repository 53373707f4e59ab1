"""``compress_(..., other_linears="int8" | "int4")``: the linears no FFN pack covers, quantized in place.

Attention projections and the LM head are about a third of the bytes a decoder reads per token. After
``compress_`` swaps the FFNs, every module that is exactly an ``nn.Linear`` (attention q/k/v/o, the LM
head, the linears of FFNs left dense) becomes a weight-only ``runtime.quantized_linear.QuantizedLinear``:
int8 per output channel, or int4 in groups of 32 inputs. Left dense, with the reason in the report:
linears matching ``skip`` (their own name or a module above them), linears inside routed MoE experts
(not considered), int4 linears whose input size is not a multiple of the group, and subclasses of
``nn.Linear`` (``nn.MultiheadAttention`` reads its ``out_proj.weight`` directly).

Tied weights: an LM head sharing its weight with the input embedding (SmolLM2, Gemma, ...) is quantized
too, and untied: the embedding keeps the dense matrix (it reads one row per token), the head reads
the quantized copy (the whole matrix per token: SmolLM2's head is a fifth of its bytes read). Bytes
read per token drop by the head's share; bytes held *grow* by the quantized copy, and the report says
so. ``skip=["lm_head"]`` keeps a tied head dense and tied instead. A transformers model's config is
set to ``tie_word_embeddings=False`` so its checkpoint loads untied; a tied weight whose model ties
other weights under the same switch is left dense (untying it would untie those too).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .config import name_matches
from .runtime.quantized_linear import ELEMENT_TYPES, INT4_GROUP, OTHER_LINEARS, QuantizedLinear


@dataclasses.dataclass
class QuantizedLinearEntry:
    """What ``compress_(other_linears=...)`` did with one ``nn.Linear``: ``dtype`` "int8" / "int4", or
    "dense" with ``reason``. ``tied_to``: the parameter its dense weight was shared with (that one keeps
    it, so quantizing frees nothing and adds ``resident_bytes`` held)."""

    name: str
    dtype: str
    dense_bytes: int = 0  # its weight and bias bytes before (read per token, and held unless tied)
    resident_bytes: int = 0  # what its QuantizedLinear holds (and reads per token)
    tied_to: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (a checkpoint's config keeps it)."""
        return dataclasses.asdict(self)

    @property
    def held_before(self) -> int:
        """Bytes the model held for this linear before that quantizing it frees (0 when tied)."""
        return 0 if self.tied_to else self.dense_bytes


def quantize_other_linears(model: torch.nn.Module, other_linears: str, skip: tuple[str, ...],
                           not_considered: list[tuple[str, str]]) -> list[QuantizedLinearEntry]:
    """Replace every exact ``nn.Linear`` of ``model`` by a ``QuantizedLinear`` (see the module
    docstring); returns one entry per linear, quantized or left dense.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
        >>> entries = quantize_other_linears(model, "int8", skip=("2",), not_considered=[])
        >>> [(e.name, e.dtype) for e in entries], type(model[0]).__name__
        ([('0', 'int8'), ('2', 'dense')], 'QuantizedLinear')
        >>> shared = torch.nn.Linear(8, 8)
        >>> twice = torch.nn.Sequential(shared, torch.nn.ReLU(), shared)
        >>> [e.name for e in quantize_other_linears(twice, "int8", (), [])], twice[0] is twice[2]
        (['0'], True)
    """
    bits = OTHER_LINEARS[other_linears]
    shared = _shared_names(model)
    untie, keep_tied = _hf_ties(model)
    entries, quantized, done = [], [], {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if type(module) is not torch.nn.Linear:
            continue
        if id(module) in done:  # one module under several names: one replacement, reported once
            if done[id(module)] is not None:
                model.set_submodule(name, done[id(module)])
            continue
        weight = module.weight
        entry = QuantizedLinearEntry(name, "dense", _bytes(module))
        tied = [n for n in shared.get(id(weight), []) if n != f"{name}.weight"]
        entry.tied_to = tied[0] if tied else ""
        entry.reason = _why_dense(name, module, bits, skip, not_considered, f"{name}.weight" in keep_tied)
        if not entry.reason:
            with torch.no_grad():
                replacement = QuantizedLinear.from_linear(module, bits, INT4_GROUP)
            model.set_submodule(name, replacement)
            entry.dtype, entry.resident_bytes = other_linears, replacement.resident_bytes()
            quantized.append(f"{name}.weight")
        done[id(module)] = None if entry.reason else model.get_submodule(name)
        entries.append(entry)
    _untie(model, untie, quantized)
    return entries


def _why_dense(name: str, module: torch.nn.Linear, bits: int, skip: tuple[str, ...],
               not_considered: list[tuple[str, str]], tied_with_others: bool) -> str:
    """Why the linear ``name`` stays dense, or "" to quantize it."""
    ancestors = [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)]
    if any(name_matches(a, skip) for a in ancestors):
        return "skipped (skip=)"
    if any(name.startswith(f"{n}.") or n in ("", name) for n, _ in not_considered):
        return "inside routed MoE experts (not considered)"
    if module.weight.dtype not in ELEMENT_TYPES.values() or module.weight.device.type == "meta":
        return f"weight is {module.weight.dtype} on {module.weight.device}: left dense"
    if bits == 4 and module.in_features % INT4_GROUP:
        return f"int4 needs in_features a multiple of {INT4_GROUP}, got {module.in_features}: left dense"
    if tied_with_others:
        return "tied weight, and its model ties other weights under the same config switch: left dense"
    return ""


def _bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _shared_names(model: torch.nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every name it has in ``model`` (tied weights have several)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _hf_ties(model: torch.nn.Module) -> tuple[list[tuple[str, torch.nn.Module]], set[str]]:
    """The transformers models inside ``model`` that tie weights by config, as (prefix, module), and
    the tied weight names that cannot be untied alone (their model ties others too)."""
    holders, keep = [], set()
    for prefix, module in model.named_modules():
        config = getattr(module, "config", None)
        expand = getattr(module, "get_expanded_tied_weights_keys", None)
        if config is None or expand is None or not getattr(config, "tie_word_embeddings", False):
            continue
        own = expand(all_submodels=False)
        if not own:
            continue
        holders.append((prefix, module))
        full = {_join(prefix, k): _join(prefix, v) for k, v in own.items()}
        if len(full) > 1:  # untying one pair would untie the others
            keep.update(full)
            keep.update(full.values())
    return holders, keep


def _untie(model: torch.nn.Module, holders: list[tuple[str, torch.nn.Module]], quantized: list[str]) -> None:
    """Set ``tie_word_embeddings=False`` on each transformers model whose tie covers a quantized weight
    (its checkpoint then loads untied), and drop those pairs from every ``all_tied_weights_keys``."""
    hit = set()
    for prefix, module in holders:
        own = {_join(prefix, k): _join(prefix, v) for k, v in module.get_expanded_tied_weights_keys().items()}
        pairs = {k for k, v in own.items() if k in quantized or v in quantized}
        if pairs:
            module.config.tie_word_embeddings = False
            hit |= pairs
    for name, sub in model.named_modules():
        keys = getattr(sub, "all_tied_weights_keys", None)
        if hit and isinstance(keys, dict):
            for k in [k for k in keys if _join(name, k) in hit]:
                keys.pop(k)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name
