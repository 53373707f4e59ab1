"""Routed MoE experts: the FFN weights tardis does not consider, found so reports can say so.

tardis folds dense FFNs (DESIGN section 1), matched as linears in the dynamo graph. The routed
experts of a mixture-of-experts layer are not such FFNs: in transformers 5 (Qwen2-MoE, Qwen3-MoE,
Mixtral, ...) one ``...mlp.experts`` module holds every expert's weights as fused 3-D parameters,
e.g. ``gate_up_proj`` (num_experts, 2 m, d) and ``down_proj`` (num_experts, d, m), and picks rows
of them per token. Only a shared expert (a dense FFN run on every token) is found and compressed;
without a note, a report of "2/2 FFNs compressed" would hide that most of the FFN weights stay
dense. ``compress_`` and ``explain`` both list them with ``routed_experts``.
"""
from __future__ import annotations

from typing import Iterable

import torch

#: Why routed experts are left alone (the reports' wording).
ROUTED_EXPERTS_REASON = "routed MoE experts: tardis compresses dense FFNs only; they stay dense"


def routed_experts(model: torch.nn.Module, ffns: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(module FQN, reason) of each module of ``model`` holding routed-expert weights that no FFN
    named in ``ffns`` (the FFNs a matcher found, compressed or not) covers, outermost first.

    A module holds routed experts when it has two or more 3-D parameters of one leading size (the
    experts' stacked matrices; convolutions excluded), or when its name ends in "experts" (not
    "shared_experts": a shared expert is a dense FFN) and it holds parameters. Modules at or below a
    found FFN are covered. Where an experts container holds expert modules of its own and some were
    found as FFNs, its other experts are listed one by one.

    Example:
        >>> class Experts(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gate_up_proj = torch.nn.Parameter(torch.zeros(4, 32, 8))
        ...         self.down_proj = torch.nn.Parameter(torch.zeros(4, 8, 16))
        >>> block = torch.nn.ModuleDict({"experts": Experts(), "shared_expert": torch.nn.Linear(8, 8)})
        >>> routed_experts(block, ["shared_expert"])
        [('experts', 'routed MoE experts: tardis compresses dense FFNs only; they stay dense')]
    """
    found = list(ffns)
    out: list[tuple[str, str]] = []
    listed: list[str] = []
    for name, module in model.named_modules():
        if _inside(name, listed) or _covered(name, found) or not _holds_experts(name, module):
            continue
        listed.append(name)
        if _stacked(module) or not any(_inside(f, [name]) for f in found):
            out.append((name, ROUTED_EXPERTS_REASON))
            continue
        # Experts as modules of their own, some found as FFNs (those the example call routed to).
        for child, sub in module.named_children():
            fqn = f"{name}.{child}" if name else child
            if not _covered(fqn, found) and not any(_inside(f, [fqn]) for f in found) \
                    and next(sub.parameters(), None) is not None:
                out.append((fqn, ROUTED_EXPERTS_REASON))
    return out


def _inside(name: str, parents: list[str]) -> bool:
    """Whether module ``name`` lies strictly below one of ``parents``."""
    return any(name.startswith(f"{p}.") or (p == "" and name != "") for p in parents)


def _covered(name: str, ffns: list[str]) -> bool:
    """Whether module ``name`` is a found FFN or lies below one (FFN names drop a "#k" tie suffix)."""
    bases = [f.split("#")[0] for f in ffns]
    return name in bases or _inside(name, bases)


def _stacked(module: torch.nn.Module) -> bool:
    """Two or more direct 3-D parameters with one leading size: stacked expert matrices."""
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return False
    leading = [p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3]
    return any(leading.count(n) >= 2 for n in set(leading))


def _holds_experts(name: str, module: torch.nn.Module) -> bool:
    last = name.rsplit(".", 1)[-1].lower()
    named = last.endswith("experts") and "shared" not in last
    return _stacked(module) or (named and next(module.parameters(), None) is not None)
