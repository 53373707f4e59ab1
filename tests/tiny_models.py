"""Tiny random-weight HF models of every plain-FFN architecture we support, built in memory.

Weights are re-drawn so FFN pre-activations spread over the nonlinear part of the activation
(HF's default init, std 0.02, would keep every neuron in the linear region and test nothing).
"""
from __future__ import annotations

import torch
import transformers as T

ARCHITECTURES = ("gpt2", "bert", "opt", "falcon", "bloom", "gpt_neox")
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
    else:
        raise KeyError(arch)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


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


def token_batches(n: int, length: int = 16, batch: int = 2, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (batch, length), generator=g) for _ in range(n)]


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state
