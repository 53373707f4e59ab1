"""Checkpoints and generation for the vLLM tier: tiny random-weight models whose attention vLLM's CPU
kernels take (head_dim 32: they have no kernel for 16), the HF side and the vLLM side."""
from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import transformers as T

import tardis_compiler as tc
from tests.tiny_models import build_tiny, token_batches

#: Tiny shapes vLLM's CPU attention serves (head sizes 32, 64, ...).
TINY = dict(hidden_size=64, head_dim=32, intermediate_size=256)
#: Token prompts for the tiny models (vocabulary 96; 0-2 are special).
PROMPTS = [[3, 5, 7, 9, 11], [40, 41, 42], [90, 3, 17, 55, 23, 8, 64], [12] * 6]


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny ``arch`` model (tests/tiny_models.py) at vLLM-servable shapes; qwen3 and gemma2 too."""
    if arch in ("qwen3", "gemma2"):
        torch.manual_seed(seed)
        shape = dict(vocab_size=96, num_hidden_layers=2, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, **TINY)
        cfg = T.Qwen3Config(**shape) if arch == "qwen3" else T.Gemma2Config(
            hidden_activation="gelu_pytorch_tanh", sliding_window=8, query_pre_attn_scalar=32, **shape)
        model = T.AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 1.0 / p.shape[1] ** 0.5 * 1.5)
        return model.eval()
    return build_tiny(arch, seed=seed, **TINY)


def save_tiny(arch: str, folder: Path, guard: str | None = None, compress: bool = True) -> Path:
    """A tiny ``arch`` checkpoint in ``folder``: compressed (``guard``: compress_'s) or dense. Every
    call takes the guarded paths (``dense_above=-1``): vLLM batches prompts that transformers runs one
    at a time, and with a threshold a batch would run every bundle exact where a single token does not."""
    model = tiny_model(arch)
    if compress:
        batches = token_batches(4)
        profile = tc.calibrate(model, batches, tc.CalibrationConfig(progress=False, group_size=32))
        tc.compress_(model, profile, batches[0], guard=guard, dense_above=-1)
    model.save_pretrained(folder)
    return folder


def hf_tokens(folder: Path, prompts: Sequence[Sequence[int]], max_tokens: int, dtype: torch.dtype) -> list[list[int]]:
    """Greedy new tokens of the transformers model of ``folder``, one prompt at a time, never stopping
    at EOS (as vLLM's ``ignore_eos``): a plain KV-cache loop, what ``generate`` runs."""
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    out = []
    with torch.no_grad():
        for prompt in prompts:
            step = model(torch.tensor([list(prompt)]), use_cache=True)
            tokens = []
            for _ in range(max_tokens):
                token = int(step.logits[0, -1].argmax())
                tokens.append(token)
                step = model(torch.tensor([[token]]), past_key_values=step.past_key_values, use_cache=True)
            out.append(tokens)
    return out


@contextlib.contextmanager
def engine(folder: Path, dtype: str = "float32", **kwargs: Any) -> Iterator[Any]:
    """A vLLM ``LLM`` of ``folder`` in this process (eager unless told), shut down on exit."""
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    options = dict(enforce_eager=True, dtype=dtype, distributed_executor_backend="uni", seed=0,
                   skip_tokenizer_init=not (Path(folder) / "tokenizer.json").exists(), max_model_len=128)
    options.update(kwargs)
    llm = None
    try:
        llm = LLM(model=str(folder), **options)
        yield llm
    finally:
        # Shut the engine down now, not when the caller's last reference goes: a ``with engine(a) as llm``
        # followed by ``with engine(b) as llm`` frees engine a only after b started, and a's shutdown
        # then destroyed b's parallel groups ("pipeline model parallel group is not initialized").
        client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        finalizer = getattr(client, "_finalizer", None)
        if finalizer is not None:
            finalizer()  # runs once; a later collection of ``llm`` finds it dead
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def vllm_tokens(llm: Any, prompts: Sequence[Sequence[int]], max_tokens: int, one_at_a_time: bool = False) -> list[list[int]]:
    """Greedy new tokens of ``llm`` (all prompts in one batch, or one request at a time)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    groups = [[p] for p in prompts] if one_at_a_time else [list(prompts)]
    out = []
    for group in groups:
        results = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in group], params, use_tqdm=False)
        out += [list(r.outputs[0].token_ids) for r in results]
    return out


def mlp_kinds(llm: Any) -> dict[str, int]:
    """How many modules of each MLP class the served model holds (``TardisMLP`` or the stock ones)."""
    def count(model: torch.nn.Module) -> dict[str, int]:
        kinds: dict[str, int] = {}
        for name, module in model.named_modules():
            if name.endswith(".mlp"):
                kinds[type(module).__name__] = kinds.get(type(module).__name__, 0) + 1
        return kinds
    return llm.apply_model(count)[0]
