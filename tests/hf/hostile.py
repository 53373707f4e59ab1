"""Hostile checkpoints: every way a saved tardis checkpoint can be mutated, and a worker process
that loads each one and runs a first forward, reporting one JSON line per case.

``cases(folder, seed)`` lists (name, mutate) pairs for a checkpoint folder; ``mutate(dst)`` edits a
copy in place. The worker (``python -m tests.hf.hostile LIST.json``) prints, per case,
``{"case", "outcome", "error", "message"}`` with outcome "same" (logits equal the untouched
checkpoint's), "different", "load_error" or "call_error"; a crash ends the process, and the test
names the case it was on (the one after the last line printed).
"""
from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

PACK = ("weights", "guard", "floats", "meta", "neurons")
DTYPES = (torch.int8, torch.int32, torch.int64, torch.uint8, torch.float16, torch.float32, torch.bfloat16,
          torch.float64)
LAYOUT_INTS = ("d_in", "d_out", "m", "k_guard", "k_always", "group", "rank")
HUGE = (10 ** 12, 2 ** 62, -1, -(2 ** 62), 0)
NO_DIGEST = " (format 2, no sha256)"

Mutation = Callable[[Path], None]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _edit_tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Mutation:
    def mutate(folder: Path) -> None:
        tensors = _tensors(folder)
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return mutate


def _edit_config(edit: Callable[[dict], None], keep_digest: bool = True) -> Mutation:
    def mutate(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        quant = config["quantization_config"]
        edit(quant)
        if not keep_digest:  # as a format-2 checkpoint, written before the sha256 was recorded
            quant["format_version"] = 2
            for swap in quant["modules"].values():
                if isinstance(swap, dict) and isinstance(swap.get("ffn"), dict):
                    swap["ffn"].pop("sha256", None)
        (folder / "config.json").write_text(json.dumps(config))
    return mutate


def _both(*mutations: Mutation) -> Mutation:
    def mutate(folder: Path) -> None:
        for m in mutations:
            m(folder)
    return mutate


def _random_bytes(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    raw = torch.tensor(list(rng.randbytes(t.numel() * t.element_size())), dtype=torch.uint8)
    return raw.view(t.dtype).reshape(t.shape) if t.numel() else t


def cases(folder: Path, seed: int) -> list[tuple[str, Mutation]]:
    """Every mutation of the checkpoint in ``folder``, as (name, mutate); each tensor mutation both
    as it is and in a format-2 checkpoint, which records no sha256 (so the structural checks are
    tested on their own: ``NO_DIGEST``)."""
    rng = random.Random(seed)
    config = json.loads((folder / "config.json").read_text())
    targets = list(config["quantization_config"]["modules"])
    target = targets[0]
    stored = _tensors(folder)
    out: list[tuple[str, Mutation]] = []

    def tensor_case(name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
        out.append((name, _edit_tensors(edit)))
        out.append((name + NO_DIGEST, _both(_edit_tensors(edit), _edit_config(lambda q: None, False))))

    for part in PACK:
        key = f"{target}.{part}"
        original = stored[key]
        for dtype in DTYPES:
            if dtype != original.dtype:
                tensor_case(f"{part} as {dtype}", lambda t, k=key, d=dtype: t.__setitem__(k, t[k].to(d)))
        if original.numel():
            tensor_case(f"{part} one short", lambda t, k=key: t.__setitem__(k, t[k][:-1].clone()))
            tensor_case(f"{part} 2-D", lambda t, k=key: t.__setitem__(k, t[k].reshape(1, -1).clone()))
            tensor_case(f"{part} random bytes",
                        lambda t, k=key, r=random.Random(rng.random()): t.__setitem__(k, _random_bytes(t[k], r)))
        tensor_case(f"{part} one longer", lambda t, k=key: t.__setitem__(k, torch.cat([t[k], t[k][:1] if t[k].numel()
                                                                                        else t[k].new_zeros(1)])))
        tensor_case(f"{part} removed", lambda t, k=key: t.pop(k))
        if original.is_floating_point() and original.numel():
            i = rng.randrange(original.numel())
            for bad in (float("nan"), float("inf")):
                tensor_case(f"{part}[{i}] = {bad}", lambda t, k=key, i=i, v=bad: _set(t, k, i, v))
    from tardis_compiler.runtime.layout import META_FIELDS

    for field, name in enumerate(META_FIELDS):
        for value in (*HUGE, int(stored[f"{target}.meta"][field]) + 1):
            tensor_case(f"meta {name} = {value}", lambda t, f=field, v=value: _set(t, f"{target}.meta", f, v))
    if stored[f"{target}.neurons"].numel():
        for value in (*HUGE, config["quantization_config"]["modules"][target]["ffn"]["layout"]["m"]):
            tensor_case(f"neurons[0] = {value}", lambda t, v=value: _set(t, f"{target}.neurons", 0, v))
    tensor_case("extra tensor in the module", lambda t: t.__setitem__(f"{target}.extra", torch.zeros(3)))

    layout_path = lambda q: q["modules"][target]["ffn"]["layout"]  # noqa: E731
    for field in LAYOUT_INTS:
        for value in (*HUGE, layout_path(config["quantization_config"])[field] + 1, "7", None, 1.5):
            out.append((f"config {field} = {value!r}",
                        _edit_config(lambda q, f=field, v=value: layout_path(q).__setitem__(f, v))))
    for field, values in {"kind": ["plain", "gated", "moe"], "activation": ["relu", "gelu", "silu", "no_such"],
                          "element_type": ["float32", "bfloat16", "float16", "int8"], "guard": ["int8", "int4", "svd", "none"],
                          "bundles": ["dense", "int8", "int4"], "has_wf": [True, False, 1]}.items():
        for value in values:
            if value != layout_path(config["quantization_config"]).get(field):
                out.append((f"config {field} = {value!r}",
                            _edit_config(lambda q, f=field, v=value: layout_path(q).__setitem__(f, v))))
    spec = lambda q: q["modules"][target]["ffn"]  # noqa: E731
    layer = target.rsplit(".", 1)[0]
    config_edits = {
        "format_version 99": lambda q: q.__setitem__("format_version", 99),
        "spec_version 1": lambda q: spec(q).__setitem__("spec_version", 1),
        "spec unknown key": lambda q: spec(q).__setitem__("code", "import os"),
        "sha256 changed": lambda q: spec(q).__setitem__("sha256", "0" * 64),
        "sha256 removed": lambda q: spec(q).pop("sha256"),
        "dense_key into the pack": lambda q: spec(q).__setitem__("dense_key", "weights"),
        "dense_key junk": lambda q: spec(q).__setitem__("dense_key", "../../x"),
        "identities at attention": lambda q: q["modules"][target].__setitem__(
            "identities", [f"{layer}.self_attn.o_proj", f"{layer}.self_attn.q_proj"]),
        "identities at the lm head": lambda q: q["modules"][target].__setitem__("identities", ["lm_head"]),
        "mode changed": lambda q: q["modules"][target].__setitem__(
            "mode", "split" if q["modules"][target]["mode"] == "module" else "module"),
        "target is attention": lambda q: q["modules"].__setitem__(f"{layer}.self_attn", q["modules"].pop(target)),
        "target is the layer": lambda q: q["modules"].__setitem__(layer, q["modules"].pop(target)),
        "target is missing": lambda q: q["modules"].__setitem__(f"{layer}.nothing", q["modules"].pop(target)),
        "target nested in another": lambda q: q["modules"].__setitem__(
            f"{targets[-1]}.inner", json.loads(json.dumps(q["modules"][targets[-1]]))),
        "modules is a list": lambda q: q.__setitem__("modules", list(q["modules"])),
        "entry is a string": lambda q: q["modules"].__setitem__(target, "module"),
        "layout missing": lambda q: spec(q).pop("layout"),
    }
    for name, edit in config_edits.items():
        out.append((f"config {name}", _edit_config(edit)))
    if config["quantization_config"].get("linears"):
        out.extend(linear_cases(folder, seed))
    return out


def linear_cases(folder: Path, seed: int) -> list[tuple[str, Mutation]]:
    """Every mutation of the first quantized linear (``compress_(other_linears=...)``) of the checkpoint
    in ``folder``, and of the ``linears`` entries of its config, as (name, mutate)."""
    rng = random.Random(seed)
    config = json.loads((folder / "config.json").read_text())
    quant = config["quantization_config"]
    target = next(iter(quant["linears"]))
    stored = _tensors(folder)
    keys = sorted(k for k in stored if k.startswith(f"{target}."))
    out: list[tuple[str, Mutation]] = []

    def case(name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
        out.append((f"linear {name}", _edit_tensors(edit)))

    for key in keys:
        part, original = key[len(target) + 1:], stored[key]
        for dtype in DTYPES:
            if dtype != original.dtype:
                case(f"{part} as {dtype}", lambda t, k=key, d=dtype: t.__setitem__(k, t[k].to(d)))
        case(f"{part} removed", lambda t, k=key: t.pop(k))
        case(f"{part} one longer", lambda t, k=key: t.__setitem__(k, _one_longer(t[k])))
        if original.numel():
            case(f"{part} flattened", lambda t, k=key: t.__setitem__(k, t[k].reshape(-1).clone()))
            case(f"{part} one row short", lambda t, k=key: t.__setitem__(k, t[k][:-1].clone()))
            case(f"{part} random bytes",
                 lambda t, k=key, r=random.Random(rng.random()): t.__setitem__(k, _random_bytes(t[k], r)))
    scales = "scale" if f"{target}.scale" in stored else "scales_and_zeros"
    count = stored[f"{target}.{scales}"].numel()
    for i in sorted({0, rng.randrange(count) & ~1, count - 2}):  # scales (int4: even elements; zeros odd)
        for bad in (float("nan"), float("inf"), 0.0, -1.0, -float("inf")):
            case(f"{scales}[{i}] = {bad}", lambda t, i=i, v=bad: _set(t, f"{target}.{scales}", i, v))
    if scales == "scales_and_zeros":
        for bad in (float("nan"), float("inf")):
            case(f"zero[1] = {bad}", lambda t, v=bad: _set(t, f"{target}.scales_and_zeros", 1, v))
    else:
        case("qweight[0] = -128", lambda t: _set(t, f"{target}.qweight", 0, -128))
    if f"{target}.bias" in stored:
        case("bias[0] = nan", lambda t: _set(t, f"{target}.bias", 0, float("nan")))
    out_features, in_features = quant["linears"][target]["linear"]["out_features"], \
        quant["linears"][target]["linear"]["in_features"]
    case("dense weight stored", lambda t: t.__setitem__(f"{target}.weight", torch.zeros(out_features, in_features)))
    case("extra tensor", lambda t: t.__setitem__(f"{target}.extra", torch.zeros(3)))

    spec = lambda q: q["linears"][target]["linear"]  # noqa: E731
    ffn = next(iter(quant["modules"]), None)
    embedding = next(k for k in stored if k.endswith("embed_tokens.weight"))[:-len(".weight")]
    layer = ffn.rsplit(".", 1)[0] if ffn else target.rsplit(".", 1)[0]
    edits = {
        "spec_version 2": lambda q: spec(q).__setitem__("spec_version", 2),
        "unknown key": lambda q: spec(q).__setitem__("code", "import os"),
        "bits removed": lambda q: spec(q).pop("bits"),
        "bits 3": lambda q: spec(q).__setitem__("bits", 3),
        "bits swapped": lambda q: spec(q).update(bits=12 - spec(q)["bits"], group=32 if spec(q)["bits"] == 8 else 0),
        "bits true": lambda q: spec(q).__setitem__("bits", True),
        "group 64": lambda q: spec(q).__setitem__("group", 64),
        "group 7": lambda q: spec(q).__setitem__("group", 7),
        "in_features + 32": lambda q: spec(q).__setitem__("in_features", spec(q)["in_features"] + 32),
        "out_features + 16": lambda q: spec(q).__setitem__("out_features", spec(q)["out_features"] + 16),
        "out_features huge": lambda q: spec(q).__setitem__("out_features", 2 ** 40),
        "out_features '7'": lambda q: spec(q).__setitem__("out_features", "7"),
        "bias flipped": lambda q: spec(q).__setitem__("bias", not spec(q)["bias"]),
        "element_type float16": lambda q: spec(q).__setitem__("element_type", "float16"),
        "element_type int8": lambda q: spec(q).__setitem__("element_type", "int8"),
        "sha256 changed": lambda q: spec(q).__setitem__("sha256", "0" * 64),
        "sha256 removed": lambda q: spec(q).pop("sha256"),
        "target is attention": lambda q: q["linears"].__setitem__(f"{layer}.self_attn", q["linears"].pop(target)),
        "target is the embedding": lambda q: q["linears"].__setitem__(embedding, q["linears"].pop(target)),
        "target is missing": lambda q: q["linears"].__setitem__(f"{layer}.nothing", q["linears"].pop(target)),
        "target is the model": lambda q: q["linears"].__setitem__("", q["linears"].pop(target)),
        "target is an FFN swap": lambda q: q["linears"].__setitem__(ffn or target, q["linears"].pop(target)),
        "target inside an FFN swap": lambda q: q["linears"].__setitem__(
            f"{ffn}.down_proj" if ffn else target, q["linears"].pop(target)),
        "target is an FFN identity": lambda q: q["linears"].__setitem__(
            (q["modules"][ffn]["identities"] or [ffn])[-1] if ffn else target, q["linears"].pop(target)),
        "linears is a list": lambda q: q.__setitem__("linears", list(q["linears"])),
        "entry is a string": lambda q: q["linears"].__setitem__(target, "int8"),
        "entry without spec": lambda q: q["linears"][target].pop("linear"),
    }
    out.extend((f"linear config {name}", _edit_config(edit)) for name, edit in edits.items())
    return out


def _one_longer(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return torch.cat([flat, flat[:1] if flat.numel() else flat.new_zeros(1)])


def _set(t: dict[str, torch.Tensor], key: str, index: int, value: float) -> None:
    tensor = t[key].clone()
    tensor.view(-1)[index] = value
    t[key] = tensor


def write_case(source: Path, dst: Path, mutate: Mutation) -> None:
    """A copy of the checkpoint ``source`` at ``dst`` with ``mutate`` applied."""
    shutil.copytree(source, dst)
    mutate(dst)


def run_cases(listing: dict) -> None:
    """The worker: load each case folder, run a short and a long first call, print one line each."""
    import transformers as T

    import tardis_compiler  # noqa: F401  (registers the quantizer)

    dtype = getattr(torch, listing["dtype"])
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(3, 90, (1, n), generator=g) for n in (1, 3, 70)]  # the kernel, then the torch path

    def outputs(folder: str) -> list[torch.Tensor]:
        model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        with torch.no_grad():
            return [model(x).logits for x in inputs]

    reference = outputs(listing["pristine"])
    for name, folder in listing["cases"]:
        line = {"case": name}
        try:
            got = outputs(folder)
        except Exception as exc:  # noqa: BLE001 - the outcome is what we report
            line.update(outcome="error", error=type(exc).__name__, message=str(exc)[:400],
                        tardis=any("tardis_compiler" in f.filename for f in _frames(exc)))
        else:
            same = all(torch.equal(a, b) for a, b in zip(got, reference))
            line.update(outcome="same" if same else "different")
        print(json.dumps(line), flush=True)


def _frames(exc: BaseException):
    import traceback

    return traceback.extract_tb(exc.__traceback__)


if __name__ == "__main__":
    run_cases(json.loads(Path(sys.argv[1]).read_text()))
