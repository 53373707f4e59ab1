"""Checks of a checkpoint's quantized linears (``QuantizedLinear``), as ``validate.py``'s are of packs.

A checkpoint is untrusted input (docs/usage.md, "Trust model"). Before any tensor is allocated, each
``quantization_config.linears`` entry must be a spec this package writes (``check_spec``), name a
module of the dense model that is exactly an ``nn.Linear`` of those shapes (``validate_linear_target``:
a config cannot replace attention, an embedding or a norm), and the safetensors headers must hold
exactly its tensors with their dtypes and shapes (``validate_stored_linear``). After the weights load,
``validate_linear_values`` checks the scales (finite, > 0), the zeros and the bias (finite), the int8
codes (in [-127, 127]) and the sha256 recorded when it was saved. Errors are ``PackError`` naming the
module, the tensor or field, and the file.
"""
from __future__ import annotations

import re
from typing import Any

import torch

from .quantized_linear import ELEMENT_TYPES, SPEC_VERSION, QuantizedLinear, check_shape
from .validate import PackError, check_stored_headers

_SPEC_KEYS = {"spec_version", "bits", "group", "in_features", "out_features", "bias", "element_type", "sha256"}
_STORED = {torch.int8: "I8", torch.uint8: "U8", torch.float32: "F32", torch.bfloat16: "BF16",
           torch.float16: "F16", torch.float64: "F64"}


def check_spec(target: str, spec: Any) -> dict[str, Any]:
    """``spec`` (a ``QuantizedLinear.spec()`` read from config.json) if every field is valid, else PackError.

    Example:
        >>> spec = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), 4).spec()
        >>> check_spec("lm_head", spec) is spec
        True
        >>> check_spec("lm_head", {**spec, "bits": 3})
        Traceback (most recent call last):
        ...
        tardis_compiler.runtime.validate.PackError: tardis linear lm_head: config.json: bits must be 8 or 4, got 3
    """
    where = f"tardis linear {target}: config.json"
    if not isinstance(spec, dict):
        raise PackError(f"{where}: its entry must be an object, got {type(spec).__name__}")
    if spec.get("spec_version") != SPEC_VERSION:
        raise PackError(f"{where}: spec version {spec.get('spec_version')!r}; this tardis_compiler reads "
                        f"{SPEC_VERSION}: upgrade it, or compress the dense model again")
    unknown, missing = sorted(set(spec) - _SPEC_KEYS), sorted(_SPEC_KEYS - set(spec))
    if unknown or missing:
        raise PackError(f"{where}: unknown fields {unknown}, missing fields {missing}")
    try:
        check_shape(spec["in_features"], spec["out_features"], spec["bits"], spec["group"])
    except ValueError as exc:
        raise PackError(f"{where}: {exc}") from None
    if not isinstance(spec["bias"], bool):
        raise PackError(f"{where}: bias must be true or false, got {spec['bias']!r}")
    if spec["element_type"] not in ELEMENT_TYPES:
        raise PackError(f"{where}: element_type must be one of {sorted(ELEMENT_TYPES)}, got {spec['element_type']!r}")
    if not (isinstance(spec["sha256"], str) and re.fullmatch(r"[0-9a-f]{64}", spec["sha256"])):
        raise PackError(f"{where}: sha256 must be 64 hex digits")
    return spec


def expected_linear_tensors(target: str, spec: dict[str, Any]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor a checkpoint stores for the quantized linear at ``target``: key -> (safetensors dtype, shape).

    Example:
        >>> spec = QuantizedLinear.from_linear(torch.nn.Linear(64, 16, bias=False), 8).spec()
        >>> expected_linear_tensors("lm_head", spec)
        {'lm_head.qweight': ('I8', (16, 64)), 'lm_head.scale': ('F32', (16,)), 'lm_head.weight': ('F32', (0,))}
    """
    n, k, float_type = spec["out_features"], spec["in_features"], _STORED[ELEMENT_TYPES[spec["element_type"]]]
    if spec["bits"] == 8:
        out = {"qweight": ("I8", (n, k)), "scale": (float_type, (n,))}
    else:
        out = {"qweight": ("U8", (n, k // 2)), "scales_and_zeros": (float_type, (k // spec["group"], n, 2))}
    if spec["bias"]:
        out["bias"] = (float_type, (n,))
    out["weight"] = (float_type, (0,))  # the empty mark (runtime/quantized_linear.py)
    return {f"{target}.{name}": value for name, value in out.items()}


def validate_stored_linear(stored: dict[str, tuple[str, str, tuple[int, ...]]], target: str,
                           spec: dict[str, Any]) -> None:
    """Check a checkpoint's tensor headers (key -> (file, dtype, shape)) for the quantized linear at
    ``target``: each of its tensors there with its dtype and shape, nothing else under the module.

    Example:
        >>> spec = QuantizedLinear.from_linear(torch.nn.Linear(64, 16, bias=False), 8).spec()
        >>> stored = {k: ("model.safetensors", *v) for k, v in expected_linear_tensors("head", spec).items()}
        >>> validate_stored_linear(stored, "head", spec)
        >>> stored["head.scale"] = ("model.safetensors", "F16", (16,))
        >>> validate_stored_linear(stored, "head", spec)
        Traceback (most recent call last):
        ...
        tardis_compiler.runtime.validate.PackError: tardis linear head in model.safetensors: tensor 'head.scale' is F16 [16], its config.json spec needs F32 [16]
    """
    check_stored_headers(stored, expected_linear_tensors(target, spec), f"tardis linear {target}", "spec",
                         [target], "a quantized linear")


def validate_linear_target(model: torch.nn.Module, target: str, spec: dict[str, Any]) -> None:
    """``target`` must be a module of the dense ``model`` that is exactly an ``nn.Linear`` of the spec's
    shapes and bias (on any device, the meta device included); else PackError.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU())
        >>> spec = QuantizedLinear.from_linear(model[0], 8).spec()
        >>> validate_linear_target(model, "0", spec)
        >>> validate_linear_target(model, "1", spec)
        Traceback (most recent call last):
        ...
        tardis_compiler.runtime.validate.PackError: tardis linear 1: the model's module there is a ReLU, not an nn.Linear
    """
    if not target:
        raise PackError("tardis linear: the model itself cannot be replaced")
    try:
        module = model.get_submodule(target)
    except AttributeError:
        raise PackError(f"tardis linear {target}: the model has no module {target!r}") from None
    if type(module) is not torch.nn.Linear:
        raise PackError(f"tardis linear {target}: the model's module there is a {type(module).__name__}, "
                        "not an nn.Linear")
    if (module.out_features, module.in_features) != (spec["out_features"], spec["in_features"]) or \
            (module.bias is not None) != spec["bias"]:
        raise PackError(f"tardis linear {target}: the model's linear is {module.in_features} -> {module.out_features} "
                        f"(bias {module.bias is not None}), config.json says {spec['in_features']} -> "
                        f"{spec['out_features']} (bias {spec['bias']})")


def validate_linear_values(module: QuantizedLinear, spec: dict[str, Any], where: str) -> None:
    """After loading: the module's tensors are the spec's, the scales finite and > 0, the zeros and
    the bias finite, the int8 codes in [-127, 127], and the bytes those recorded in the spec's sha256.

    Example:
        >>> q = QuantizedLinear.from_linear(torch.nn.Linear(64, 16), 8)
        >>> spec = q.spec()
        >>> validate_linear_values(q, spec, "tardis linear head")
        >>> with torch.no_grad():
        ...     q.scale[3] = 0.0
        >>> validate_linear_values(q, spec, "tardis linear head")
        Traceback (most recent call last):
        ...
        tardis_compiler.runtime.validate.PackError: tardis linear head: tensor 'scale' holds a scale that is not finite and > 0 (at element 3)
    """
    tensors = {**module.saved_tensors(), "weight": module.weight}
    for key, (dtype, shape) in expected_linear_tensors("", spec).items():
        t = tensors.get(key[1:])
        if t is None or _STORED.get(t.dtype) != dtype or tuple(t.shape) != shape:
            got = "missing" if t is None else f"{t.dtype} {list(t.shape)}"
            raise PackError(f"{where}: tensor {key[1:]!r} is {got}, its config.json spec needs {dtype} {list(shape)}")
    if spec["bits"] == 8:
        _check(tensors["scale"], "scale", where, "a scale that is not finite and > 0", positive=True)
        codes = tensors["qweight"]
        if bool((codes == -128).any()):
            raise PackError(f"{where}: tensor 'qweight' holds -128 (codes are in [-127, 127])")
    else:
        sz = tensors["scales_and_zeros"]
        _check(sz[..., 0], "scales_and_zeros", where, "a scale that is not finite and > 0", positive=True, stride=2)
        _check(sz[..., 1], "scales_and_zeros", where, "a zero that is not finite", stride=2, offset=1)
    if "bias" in tensors:
        _check(tensors["bias"], "bias", where, "a value that is not finite")
    if module.digest() != spec["sha256"]:
        raise PackError(f"{where}: the tensors' bytes differ from the sha256 recorded when it was saved: the file "
                        "is corrupt or was changed; download or compress it again")


def _check(t: torch.Tensor, name: str, where: str, what: str, positive: bool = False, stride: int = 1,
           offset: int = 0) -> None:
    t = t.float()
    bad = ~torch.isfinite(t) | (t <= 0) if positive else ~torch.isfinite(t)
    if bool(bad.any()):
        first = int(bad.reshape(-1).nonzero()[0, 0]) * stride + offset
        raise PackError(f"{where}: tensor {name!r} holds {what} (at element {first})")
