"""Compressed checkpoints end to end: load a model, calibrate it on text, ``compress_`` it, write the
HF checkpoint (``tardis compress``); and read a checkpoint's table back (``tardis explain DIR``).
"""
from __future__ import annotations

import json
import os
import shutil
import time
import uuid
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
                        dtype: torch.dtype | None = None, progress: bool = True,
                        force: bool = False, other_linears: str | None = None,
                        weights: str | None = None, keep_dense: bool = False,
                        dense_above: int | str = "auto") -> CompressReport:
    """Load ``model_ref`` (a built-in name, a local HF folder or a .gguf file), calibrate it on the
    built-in Wikipedia calibration text (or the file ``text``) at ``budget``, ``compress_`` it
    (``bundles``: how the guarded neurons' rows are held and priced, ``CalibrationConfig.bundles``) and write the HF
    checkpoint (weights, config, tokenizer) to ``out``. ``other_linears`` ("int8", "int4"): also quantize
    the linears outside the compressed FFNs (``compress_``'s keyword). ``weights="int8"``: quantized packs,
    calibrated against the int8 model (``CalibrationConfig.weights``; ``budget`` is then a fraction of
    the int8 FFN's bytes). ``keep_dense``: the checkpoint also keeps each FFN's own linears, which
    batches and prefill run through (``compress_``'s keyword: more memory than dense). ``dense_above``:
    ``compress_``'s (calls of more tokens skip the guard; -1 never).

    ``out`` must not be (or lie inside) the model's folder, and must be new or empty unless ``force``:
    then only the files this run writes are replaced, every other file in ``out`` is kept. The checkpoint
    is written to a temporary folder beside ``out`` and moved into place at the end, so a failed or
    interrupted run leaves no half-written ``out``. ``out`` is checked before anything loads.

    Example:
        >>> # compress_pretrained("smollm2", "smollm2-tardis", 0.5, resident=0.9)
        >>> # compress_pretrained("smollm2", "smollm2-tardis-q8", 0.5, other_linears="int8", weights="int8")
        >>> # compress_pretrained("./my-llama", "./existing-folder", 0.5, force=True)
    """
    from ..eval.corpus import calibration_batches as wikipedia_batches
    from ..eval.models import check_context, is_compressed, load_model
    from ..calibrate import calibrate

    started = time.time()
    out = check_out_folder(model_ref, out, force)  # before loading: that takes seconds to minutes
    loaded = load_model(model_ref, dtype=dtype)
    if is_compressed(loaded.model):
        raise ValueError(f"{model_ref!r} is already compressed by tardis: compress the dense model")
    context = check_context(loaded.model, context_length or loaded.spec.default_context)
    if text is not None:
        batches = text_batches(loaded.tokenizer, text, context, calibration_batches)
    else:
        batches = wikipedia_batches(loaded.tokenizer, context_length=context, num_batches=calibration_batches)
    config = CalibrationConfig(budget=budget, resident=resident, skip=skip, bundles=bundles, weights=weights,
                               progress=progress)
    profile = calibrate(loaded.model, batches, config)
    report = compress_(loaded.model, profile, batches[0][:, :16], guard=guard,  # rows as calibration priced
                       other_linears=other_linears, keep_dense=keep_dense, dense_above=dense_above)
    if not report.compressed:
        raise ValueError(f"no FFN of {model_ref!r} could be compressed:\n{report}")
    _write_checkpoint(loaded.model, loaded.tokenizer, model_ref, out, force)
    report.seconds = time.time() - started
    return report


def check_out_folder(model_ref: str, out: str | Path, force: bool = False) -> Path:
    """``out`` resolved, once it is a place ``tardis compress`` may write a checkpoint of ``model_ref`` to:
    not the model's folder nor inside it (for a .gguf file: not its folder), not a file, and new or
    empty unless ``force``. Raises ``ValueError`` / ``FileExistsError`` saying what to do.

    Example:
        >>> # check_out_folder("./my-llama", "./my-llama-tardis")  -> Path('/abs/my-llama-tardis')
    """
    from ..eval.models import MODELS

    out = Path(out).expanduser().resolve()  # symlinks and ".." must not hide the model folder
    source = _model_folder(model_ref, MODELS)
    if source is not None:
        # a .gguf is one file nothing we write can overwrite: only its folder itself is off limits
        inside = out == source if Path(model_ref).suffix == ".gguf" else out.is_relative_to(source)
        if inside:
            raise ValueError(f"--out {str(out)!r} is {'the' if out == source else 'inside the'} model folder "
                             f"{str(source)!r}: writing there would overwrite or mix with the dense model; give "
                             "a new folder outside it, e.g. --out " + str(source.parent / f"{source.name}-tardis"))
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a file, not a folder: give a new or empty folder")
    if out.is_dir() and not force and any(out.iterdir()):
        raise FileExistsError(f"--out {str(out)!r} is not empty: give a new or empty folder, or pass --force "
                              "(force=True) to replace only the files the checkpoint writes and keep the others")
    return out


def _model_folder(model_ref: str, builtins: dict[str, Any]) -> Path | None:
    """The folder ``load_model`` reads ``model_ref`` from, resolved; None for a built-in name (checked
    first, as ``load_model`` does) or a path that does not exist (loading reports it)."""
    if model_ref in builtins:
        return None
    path = Path(model_ref).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path.resolve().parent
    return path.resolve() if path.is_dir() else None


def _write_checkpoint(model: Any, tokenizer: Any, model_ref: str, out: Path, force: bool) -> None:
    """Save into a temporary folder beside ``out`` (same filesystem: renames are atomic), then move it
    into place. Never ``save_pretrained`` into ``out`` itself: it deletes shard files it takes for stale."""
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    temp = out.parent / f".{out.name}.tardis-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    done = False
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temp.mkdir()  # not mkdtemp: its owner-only mode would become out's once renamed; this keeps the umask's
        model.save_pretrained(temp)
        tokenizer.save_pretrained(temp)
        check_out_folder(model_ref, out, force)  # again: the folder may have changed while we calibrated
        if not out.exists():
            os.rename(temp, out)
        else:
            written = sorted(p.relative_to(temp) for p in temp.rglob("*") if p.is_file())
            clash = [str(p) for p in written if (out / p).is_dir()]
            if clash:  # checked before moving anything, so a refusal leaves out as it was
                raise FileExistsError(f"--out {str(out)!r} holds folders where the checkpoint writes files "
                                      f"({clash}): move them away, or give another --out")
            for rel in written:
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(temp / rel, out / rel)
        done = True
    finally:  # also on KeyboardInterrupt: no temp folder, no half-written out
        shutil.rmtree(temp, ignore_errors=True)
        if not done:
            for folder in created:  # parents this run made, innermost first, while they are empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def checkpoint_table(folder: str | Path) -> str:
    """The explain table of a compressed checkpoint (from its ``config.json``; no weights load).

    Example:
        >>> # print(checkpoint_table("smollm2-tardis"))
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a checkpoint folder (no config.json)")
    try:
        config = json.loads(path.read_text())
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}): re-run tardis compress MODEL --out DIR") \
            from None
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    quant = quant if isinstance(quant, dict) else {}
    if quant.get("quant_method") != "tardis":
        raise ValueError(f"{str(folder)!r} is not a tardis checkpoint (its quantization_config is "
                         f"{quant.get('quant_method')!r}); tardis compress MODEL --out DIR writes one")
    head = (f"{'FFN':<30} {'swap':<7} {'guard':<6} {'guarded':>7} {'exact':>6} {'flag':>6} {'recall':>7} "
            f"{'rel err':>8} {'read':>6} {'held':>6}")
    lines = [f"tardis checkpoint {folder}: budget {quant.get('budget')}, guard {quant.get('guard') or 'default'}, "
             f"guarded rows {quant.get('bundles') or 'dense'}, format {quant.get('format_version')}", f"calibration: {quant.get('source', '')}", head]
    modules = quant.get("modules") or {}
    if not isinstance(modules, dict):
        raise ValueError(f"{str(path)!r}: quantization_config 'modules' is a {type(modules).__name__}, not a mapping "
                         "of module names to entries; re-run tardis compress MODEL --out DIR to rewrite it")
    dense = read = held = 0.0
    for target, swap in modules.items():
        # a hand-edited or foreign config.json must give a clean error naming the field, not a traceback
        field = _FieldReader(path, target)
        if not isinstance(swap, dict):
            raise field.error(f"is a {type(swap).__name__}, expected a mapping of fields")
        layout = field.get(field.get(swap, "ffn", dict), "layout", dict, "ffn.layout")
        k_guard = field.get(layout, "k_guard", int, "ffn.layout.k_guard")
        k_always = field.get(layout, "k_always", int, "ffn.layout.k_always")
        mode = field.get(swap, "mode", str)
        done = field.get(swap, "compressed", dict, default={})  # optional: the table shows what it has
        measured = field.get(done, "measured", dict, "compressed.measured", default={})
        name = field.get(done, "name", str, "compressed.name", default=target)
        guard = field.get(done, "guard", str, "compressed.guard", default="")
        d = field.get(done, "dense_bytes", (int, float), "compressed.dense_bytes", default=0) or 1
        r = field.get(done, "read_bytes", (int, float), "compressed.read_bytes", default=0.0)
        h = field.get(done, "resident_bytes", (int, float), "compressed.resident_bytes", default=0)
        dense, read, held = dense + d, read + r, held + h
        lines.append(f"{name:<30} {mode:<7} {guard:<6} {k_guard:>7} {k_always:>6} {_num(measured.get('flag_rate'))} "
                     f"{_num(measured.get('recall'), 7)} {_num(measured.get('rel_error'), 8)} "
                     f"{r / d:>6.3f} {h / d:>6.3f}")
    if dense:
        lines.append(f"total: reads {read / dense:.3f} of the dense FFN bytes per token, holds {held / dense:.3f}")
    lines.extend(_linears_line(path, quant.get("linears")))
    return "\n".join(lines)


def _linears_line(path: Path, linears: Any) -> list[str]:
    """The table's line for the quantized linears (``compress_(other_linears=...)``), if any."""
    if linears is None:
        return []
    if not isinstance(linears, dict):
        raise ValueError(f"{str(path)!r}: quantization_config 'linears' is a {type(linears).__name__}, not a mapping; "
                         "re-run tardis compress MODEL --out DIR to rewrite it")
    kinds: dict[str, int] = {}
    before = after = 0.0
    for target, entry in linears.items():
        field = _FieldReader(path, target)
        spec = field.get(entry if isinstance(entry, dict) else {}, "linear", dict)
        bits = field.get(spec, "bits", int, "linear.bits")
        done = field.get(entry, "compressed", dict, default={})
        before += field.get(done, "dense_bytes", (int, float), "compressed.dense_bytes", default=0)
        after += field.get(done, "resident_bytes", (int, float), "compressed.resident_bytes", default=0)
        kinds[f"int{bits}"] = kinds.get(f"int{bits}", 0) + 1
    return [f"other linears: {len(linears)} quantized ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}): "
            f"{before / 1e6:.3f} -> {after / 1e6:.3f} MB read per token"]


_REQUIRED = object()


class _FieldReader:
    """Reads the fields of one module entry of a checkpoint's quantization_config, raising a ``ValueError``
    that names the config, the module and the field when one is missing or of the wrong type."""

    def __init__(self, path: Path, target: str) -> None:
        self.path, self.target = path, target

    def get(self, entry: dict, key: str, kind: type | tuple[type, ...], field: str | None = None,
            default: Any = _REQUIRED) -> Any:
        value = entry.get(key)
        if value is None:  # absent, or null: an optional field falls back to its default
            if default is _REQUIRED:
                raise self.error(f"has no {field or key!r}")
            return default
        if not isinstance(value, kind) or isinstance(value, bool):  # bool is an int, never a count here
            names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise self.error(f"{field or key!r} is {type(value).__name__} {value!r:.40}, expected {names}")
        return value

    def error(self, what: str) -> ValueError:
        return ValueError(f"{str(self.path)!r}: quantization_config module {self.target!r} {what}; the file was "
                          "edited or written by another version: re-run tardis compress MODEL --out DIR")


def _num(value: float | None, width: int = 6) -> str:
    return f"{value:>{width}.3f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"
