"""Statistics of each FFN linear's input on the calibration tokens, shared by the baselines.

One forward pass over the calibration batches (hooks on the FFN linears, removed afterwards)
gives what Wanda/RIA need (per input feature, the L2 norm over tokens) and what TEAL needs
(a sample of |x| to read magnitude thresholds from). The result is cached per model and batches,
so running three methods at three budgets costs one pass, not nine.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import weakref
from typing import Any, Iterable, Mapping

import torch
from tqdm.auto import tqdm

from .ffn import find_ffn_linears


@dataclasses.dataclass(frozen=True)
class InputStats:
    """Calibration statistics of one linear's input x (shape [tokens, in_features]).

    Args:
        squared_sum: per input feature j, sum over tokens of x_j^2 (float64).
        tokens: number of tokens seen.
        abs_sample: sorted random sample of |x| over all tokens and features (float32).
    """

    squared_sum: torch.Tensor
    tokens: int
    abs_sample: torch.Tensor

    @property
    def feature_norm(self) -> torch.Tensor:
        """||X_j||_2 over the calibration tokens, per input feature (Wanda's activation term)."""
        return self.squared_sum.sqrt()

    def magnitude_quantile(self, q: float) -> float:
        """The |x| value below which a fraction ``q`` of input entries fall (TEAL's threshold)."""
        if q <= 0.0:
            return 0.0
        index = min(int(math.ceil(q * self.abs_sample.numel())) - 1, self.abs_sample.numel() - 1)
        return float(self.abs_sample[max(index, 0)])


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, dict[str, InputStats]]]" = (
    weakref.WeakKeyDictionary())


def model_inputs(batch: Any) -> tuple[tuple, dict]:
    """Positional and keyword arguments for ``model(...)`` from a calibration batch: a tensor
    (``input_ids``) or a mapping of keyword arguments.

    Example:
        >>> model_inputs(torch.ones(1, 4, dtype=torch.long))[0][0].shape
        torch.Size([1, 4])
    """
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if mask is not None and not bool(torch.as_tensor(mask).bool().all()):
            # Hooks see every position; padding would pollute the statistics.
            raise ValueError("calibration batches must not be padded (attention_mask has zeros); "
                             "use unpadded chunks such as corpus.calibration_batches returns")
        return (), dict(batch)
    return (batch,), {}


def ffn_input_stats(model: torch.nn.Module, batches: Iterable[Any], *, sample_size: int = 1 << 18,
                    seed: int = 0, progress: bool = False) -> dict[str, InputStats]:
    """Input statistics of every FFN linear (by qualified name) over ``batches``.

    ``model`` is run under ``no_grad`` with temporary forward hooks; its weights are not touched.
    The same |x| positions are sampled for linears that share an input (LLaMA's gate and up), so
    they get identical TEAL thresholds.

    Example:
        >>> stats = ffn_input_stats(model, batches)
        >>> stats["encoder.layer.0.output.dense"].feature_norm.shape
        torch.Size([1536])
    """
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch")
    key = (_batches_fingerprint(batches), _weights_fingerprint(model), sample_size, seed)
    cached = _CACHE.get(model, {}).get(key)
    if cached is not None:
        return cached

    linears = find_ffn_linears(model)
    squared = {f.name: torch.zeros(f.module.in_features, dtype=torch.float64) for f in linears}
    tokens = dict.fromkeys(squared, 0)
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in squared}
    per_batch = max(1, sample_size // len(batches))
    state = {"batch": 0}

    def hook(name: str):
        def record(module: torch.nn.Module, args: tuple, _output: Any) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            squared[name] += x.double().pow(2).sum(0)
            tokens[name] += x.shape[0]
            flat = x.abs().flatten()
            generator = torch.Generator().manual_seed(seed * 1_000_003 + state["batch"])
            count = min(per_batch, flat.numel())
            picks = torch.randint(flat.numel(), (count,), generator=generator)
            samples[name].append(flat[picks])
        return record

    handles = [f.module.register_forward_hook(hook(f.name)) for f in linears]
    try:
        with torch.no_grad():
            for index, batch in enumerate(tqdm(batches, desc="calibration stats", leave=False,
                                               disable=not progress)):
                state["batch"] = index
                args, kwargs = model_inputs(batch)
                model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()

    stats = {name: InputStats(squared[name], tokens[name], torch.cat(samples[name]).sort().values)
             for name in squared}
    _CACHE.setdefault(model, {})[key] = stats
    return stats


def _batches_fingerprint(batches: list[Any]) -> str:
    digest = hashlib.sha1()
    for batch in batches:
        tensors = batch.values() if isinstance(batch, Mapping) else [batch]
        for tensor in tensors:
            tensor = torch.as_tensor(tensor)
            digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _weights_fingerprint(model: torch.nn.Module) -> tuple:
    # An in-place weight update bumps _version, a reassignment changes data_ptr: either invalidates.
    return tuple((p.data_ptr(), p._version) for p in model.parameters())
