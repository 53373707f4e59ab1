"""Find a model's FFN linear layers by module name, from a small table that is easy to extend.

The compiler core finds FFNs in the FX graph; the baselines only need the ``nn.Linear`` modules,
and a name table is the simplest thing that is obviously right for the models we evaluate.
"""
from __future__ import annotations

import dataclasses
import re

import torch

#: family -> {role: regex on the module's qualified name}. Roles say where a matrix sits:
#: "in"/"gate"/"up" read the FFN input x, "down"/"out" read the hidden activation.
#: To support another architecture, add a row (GPT-NeoX: "mlp.dense_h_to_4h", "mlp.dense_4h_to_h").
FFN_LINEAR_PATTERNS: dict[str, dict[str, str]] = {
    # BERT/RoBERTa/MiniLM: `attention.output.dense` must not match, hence the layer-index anchor.
    "bert": {"in": r"(^|\.)layer\.\d+\.intermediate\.dense$",
             "out": r"(^|\.)layer\.\d+\.output\.dense$"},
    # LLaMA, Mistral, Qwen2, SmolLM2, Gemma: gated FFN down(act(gate(x)) * up(x)).
    "llama": {"gate": r"(^|\.)mlp\.gate_proj$", "up": r"(^|\.)mlp\.up_proj$",
              "down": r"(^|\.)mlp\.down_proj$"},
}


@dataclasses.dataclass(frozen=True)
class FFNLinear:
    """One FFN weight matrix: its qualified module name, role, and the module itself."""

    name: str
    role: str
    family: str
    module: torch.nn.Linear

    @property
    def weight_bytes(self) -> int:
        """Dense bytes of the weight matrix (biases are not counted: they are < 0.3% here)."""
        weight = self.module.weight
        return weight.numel() * weight.element_size()


def find_ffn_linears(model: torch.nn.Module) -> list[FFNLinear]:
    """All FFN ``nn.Linear`` modules of ``model``, in module order.

    Raises ``ValueError`` naming ``FFN_LINEAR_PATTERNS`` if there are none.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                             intermediate_size=64))
        >>> [f.name for f in find_ffn_linears(bert)][:2]
        ['encoder.layer.0.intermediate.dense', 'encoder.layer.0.output.dense']
    """
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        for family, roles in FFN_LINEAR_PATTERNS.items():
            role = next((r for r, pattern in roles.items() if re.search(pattern, name)), None)
            if role is not None:
                found.append(FFNLinear(name, role, family, module))
                break
    if not found:
        raise ValueError(
            f"found no FFN linear layers in {type(model).__name__}; add its module names to "
            f"tardis_compiler.eval.ffn.FFN_LINEAR_PATTERNS "
            f"(known families: {sorted(FFN_LINEAR_PATTERNS)})"
        )
    return found


def dense_ffn_bytes(model: torch.nn.Module) -> int:
    """Total dense bytes of the FFN weight matrices: what a dense model reads per token.

    Example:
        >>> dense_ffn_bytes(model) == 6 * 2 * 384 * 1536 * 4    # MiniLM: 6 layers, fp32
        True
    """
    return sum(f.weight_bytes for f in find_ffn_linears(model))


def set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Replace the submodule at qualified ``name`` (e.g. ``"model.layers.0.mlp.up_proj"``).

    Example:
        >>> seq = torch.nn.Sequential(torch.nn.Linear(2, 2))
        >>> set_submodule(seq, "0", torch.nn.Identity()); type(seq[0]).__name__
        'Identity'
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
