"""Tiny random-weight HF models of every FFN architecture we support, built in memory.

Weights are re-drawn so FFN pre-activations spread over the nonlinear part of the activation
(HF's default init, std 0.02, would keep every neuron in the linear region and test nothing).
"""
from __future__ import annotations

import torch
import transformers as T

ARCHITECTURES = ("gpt2", "bert", "opt", "falcon", "bloom", "gpt_neox")
#: Gated-FFN (``down(act(gate(x)) * up(x))``) architectures; phi3 fuses gate and up in one linear.
GATED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma", "gemma3", "phi3")
VOCAB = 96
HIDDEN = 32
LAYERS = 2


def _config(arch: str, **overrides):
    common = dict(vocab_size=VOCAB, num_hidden_layers=LAYERS, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch == "gpt2":
        cfg = T.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=2, vocab_size=VOCAB, n_positions=128,
                           bos_token_id=0, eos_token_id=1)
    elif arch == "bert":
        cfg = T.BertConfig(hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_attention_heads=2,
                           max_position_embeddings=128, **common)
    elif arch == "opt":
        cfg = T.OPTConfig(hidden_size=HIDDEN, ffn_dim=4 * HIDDEN, num_attention_heads=2, word_embed_proj_dim=HIDDEN,
                          max_position_embeddings=128, **common)
    elif arch == "falcon":
        cfg = T.FalconConfig(hidden_size=HIDDEN, num_attention_heads=2, **common)
    elif arch == "bloom":
        cfg = T.BloomConfig(hidden_size=HIDDEN, n_head=2, n_layer=LAYERS, vocab_size=VOCAB, bos_token_id=0,
                            eos_token_id=1, pad_token_id=2)
    elif arch == "gpt_neox":
        cfg = T.GPTNeoXConfig(hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_attention_heads=2,
                              max_position_embeddings=128, **common)
    elif arch in GATED_ARCHITECTURES:
        cfg = _gated_config(arch, common)
    else:
        raise KeyError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def _gated_config(arch: str, common: dict):
    # 2 query heads of dim 16 sharing 1 kv head (GQA), intermediate 4 * HIDDEN, short positions.
    shape = dict(hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=HIDDEN // 2, max_position_embeddings=128, **common)
    if arch == "llama":
        return T.LlamaConfig(**shape)
    if arch == "mistral":
        return T.MistralConfig(sliding_window=64, **shape)
    if arch == "qwen2":
        return T.Qwen2Config(**shape)
    if arch == "gemma":
        return T.GemmaConfig(hidden_act="gelu_pytorch_tanh", **shape)
    if arch == "gemma3":
        # Text-only causal LM; one sliding (window 8 < the 16-token test batches) and one full layer.
        return T.Gemma3TextConfig(hidden_activation="gelu_pytorch_tanh", sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention"],
                                  query_pre_attn_scalar=HIDDEN // 2, **shape)
    if arch == "phi3":  # multi-head attention, as Phi-3-mini
        return T.Phi3Config(num_key_value_heads=2, **{k: v for k, v in shape.items() if k != "num_key_value_heads"})
    raise KeyError(arch)


def build_tiny(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> torch.nn.Module:
    """A 2-layer, hidden-32 causal LM (BertModel for bert), eval mode, with spread-out weights."""
    torch.manual_seed(seed)
    cfg = _config(arch, **overrides)
    model = T.BertModel(cfg) if arch == "bert" else T.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5 * 1.5)
    return model.to(dtype).eval()


def build_tiny_moe(seed: int = 0) -> torch.nn.Module:
    """A 2-layer, hidden-32 Qwen2-MoE causal LM, eval mode: per layer 4 routed experts (fused 3-D
    ``mlp.experts`` parameters, top 2) beside one dense shared expert (``mlp.shared_expert``)."""
    torch.manual_seed(seed)
    cfg = T.Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, moe_intermediate_size=16,
                           shared_expert_intermediate_size=2 * HIDDEN, num_experts=4, num_experts_per_tok=2,
                           num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=128, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:  # the experts' stacked matrices too: (experts, out, in)
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5 * 1.5)
    return model.eval()


def token_batches(n: int, length: int = 16, batch: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, length), generator=g) for _ in range(n)]


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class ReGLUBlock(torch.nn.Module):
    """ReGLU: ``down(relu(gate(x)) * up(x))``, separate linears (with bias unless ``bias=False``)."""

    def __init__(self, d: int = 8, m: int = 16, bias: bool = True) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(d, m, bias=bias)
        self.up = torch.nn.Linear(d, m, bias=bias)
        self.down = torch.nn.Linear(m, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.gate(x)) * self.up(x))


class FusedGatedBlock(torch.nn.Module):
    """Phi-3 style: one ``gate_up`` linear (d -> 2m), ``.chunk(2, dim=-1)``, gate half first
    (``up_first=True`` swaps the halves), then ``down(act(g) * u)``."""

    def __init__(self, bias: bool = True, act=torch.nn.functional.silu, d: int = 8, m: int = 16,
                 up_first: bool = False) -> None:
        super().__init__()
        self.gate_up = torch.nn.Linear(d, 2 * m, bias=bias)
        self.down = torch.nn.Linear(m, d, bias=bias)
        self.act = act
        self.up_first = up_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up_first:
            u, g = self.gate_up(x).chunk(2, dim=-1)
        else:
            g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.act(g) * u)
