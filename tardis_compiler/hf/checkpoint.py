"""Compressed checkpoints end to end: load a model, calibrate it on text, ``compress_`` it, write the
HF checkpoint (``tardis compress``); and read a checkpoint's table back (``tardis explain DIR``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..compress import CompressReport, compress_
from ..config import CalibrationConfig


def text_batches(tokenizer: Any, path: str | Path, context_length: int, num_batches: int) -> list[torch.Tensor]:
    """Calibration windows from a text file of the user's: consecutive windows of
    ``context_length`` tokens (the last partial one dropped), at most ``num_batches``.

    Example:
        >>> # text_batches(tokenizer, "my_corpus.txt", 512, 16)[0].shape == (1, 512)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration text {str(path)!r} not found: give a UTF-8 text file")
    ids = tokenizer(path.read_text(encoding="utf-8"), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    windows = [ids[i:i + context_length] for i in range(0, ids.numel() - context_length + 1, context_length)]
    if not windows:
        raise ValueError(f"{str(path)!r} holds {ids.numel()} tokens, fewer than one window of {context_length}: "
                         "give more text (a few thousand words), or a smaller --context-length")
    return [w.unsqueeze(0) for w in windows[:num_batches]]


def compress_pretrained(model_ref: str, out: str | Path, budget: float, text: str | None = None,
                        resident: float | None = None, guard: str | None = None, skip: tuple[str, ...] = (),
                        bundles: str = "int8", calibration_batches: int = 16, context_length: int | None = None,
                        dtype: torch.dtype | None = None, progress: bool = True) -> CompressReport:
    """Load ``model_ref`` (a built-in name, a local HF folder or a .gguf file), calibrate it on the
    built-in Wikipedia calibration text (or the file ``text``) at ``budget``, ``compress_`` it
    (``bundles``: how the guarded neurons' rows are held and priced, ``CalibrationConfig.bundles``) and write the HF
    checkpoint (weights, config, tokenizer) to ``out``.

    Example:
        >>> # compress_pretrained("smollm2", "smollm2-tardis", 0.5, resident=0.9)
    """
    from ..eval.corpus import calibration_batches as wikipedia_batches
    from ..eval.models import check_context, is_compressed, load_model
    from ..calibrate import calibrate

    started = time.time()
    loaded = load_model(model_ref, dtype=dtype)
    if is_compressed(loaded.model):
        raise ValueError(f"{model_ref!r} is already compressed by tardis: compress the dense model")
    context = check_context(loaded.model, context_length or loaded.spec.default_context)
    if text is not None:
        batches = text_batches(loaded.tokenizer, text, context, calibration_batches)
    else:
        batches = wikipedia_batches(loaded.tokenizer, context_length=context, num_batches=calibration_batches)
    config = CalibrationConfig(budget=budget, resident=resident, skip=skip, bundles=bundles, progress=progress)
    profile = calibrate(loaded.model, batches, config)
    report = compress_(loaded.model, profile, batches[0][:, :16], guard=guard)  # rows as calibration priced
    if not report.compressed:
        raise ValueError(f"no FFN of {model_ref!r} could be compressed:\n{report}")
    out = Path(out)
    loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    report.seconds = time.time() - started
    return report


def checkpoint_table(folder: str | Path) -> str:
    """The explain table of a compressed checkpoint (from its ``config.json``; no weights load).

    Example:
        >>> # print(checkpoint_table("smollm2-tardis"))
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a checkpoint folder (no config.json)")
    quant = json.loads(path.read_text()).get("quantization_config") or {}
    if quant.get("quant_method") != "tardis":
        raise ValueError(f"{str(folder)!r} is not a tardis checkpoint (its quantization_config is "
                         f"{quant.get('quant_method')!r}); tardis compress MODEL --out DIR writes one")
    head = (f"{'FFN':<30} {'swap':<7} {'guard':<6} {'guarded':>7} {'exact':>6} {'flag':>6} {'recall':>7} "
            f"{'rel err':>8} {'read':>6} {'held':>6}")
    lines = [f"tardis checkpoint {folder}: budget {quant.get('budget')}, guard {quant.get('guard') or 'default'}, "
             f"guarded rows {quant.get('bundles') or 'dense'}, format {quant.get('format_version')}", f"calibration: {quant.get('source', '')}", head]
    dense = read = held = 0.0
    for target, swap in quant.get("modules", {}).items():
        layout, done = swap["ffn"]["layout"], swap.get("compressed", {})
        measured = done.get("measured", {})
        d = done.get("dense_bytes") or 1
        dense, read, held = dense + d, read + done.get("read_bytes", 0.0), held + done.get("resident_bytes", 0)
        lines.append(f"{done.get('name', target):<30} {swap['mode']:<7} {done.get('guard', ''):<6} "
                     f"{layout['k_guard']:>7} {layout['k_always']:>6} {_num(measured.get('flag_rate'))} "
                     f"{_num(measured.get('recall'), 7)} {_num(measured.get('rel_error'), 8)} "
                     f"{done.get('read_bytes', 0.0) / d:>6.3f} {done.get('resident_bytes', 0) / d:>6.3f}")
    if dense:
        lines.append(f"total: reads {read / dense:.3f} of the dense FFN bytes per token, holds {held / dense:.3f}")
    return "\n".join(lines)


def _num(value: float | None, width: int = 6) -> str:
    return f"{value:>{width}.3f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"
