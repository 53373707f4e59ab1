"""The method registry: each method turns (dense model, calibration batches, budget) into a
``PreparedModel`` (the model to evaluate plus its FFN byte accounting).

Adding a method is one call::

    from tardis_compiler.eval import PreparedModel, register_method

    def my_method(model, batches, budget) -> PreparedModel: ...
    register_method("mine", my_method)

The harness evaluates every registered method (in registration order) unless told otherwise.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import torch

from ..compress import compressed_bytes
from .accounting import FFNBytes, PreparedModel
from .activation_sparsity import teal
from .ffn import dense_ffn_bytes
from .pruning import ria, wanda
from .tardis_method import tardis

MethodFn = Callable[[torch.nn.Module, Iterable[Any], float], PreparedModel]


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method. ``uses_budget=False`` (the dense model) runs once, at budget 1.0."""

    name: str
    fn: MethodFn
    uses_budget: bool = True


_METHODS: dict[str, Method] = {}


def register_method(name: str, fn: MethodFn, *, uses_budget: bool = True,
                    replace: bool = False) -> None:
    """Register ``fn(model, batches, budget) -> PreparedModel`` under ``name``.

    ``fn`` must not modify ``model`` (work on a copy, or wrap it). Registering a taken name is an
    error unless ``replace=True``.

    Example:
        >>> register_method("dense-again", dense, uses_budget=False)
        >>> "dense-again" in method_names()
        True
        >>> unregister_method("dense-again")
    """
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"method names are letters, digits, '-' and '_', got {name!r}")
    if name in _METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered; pass replace=True to override")
    if not callable(fn):
        raise TypeError(f"method {name!r}: fn must be callable, got {type(fn).__name__}")
    _METHODS[name] = Method(name, fn, uses_budget)


def unregister_method(name: str) -> None:
    """Remove a registered method (tests and notebooks). Example: ``unregister_method("mine")``."""
    _METHODS.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method called ``name``.

    Example:
        >>> get_method("wanda").uses_budget
        True
    """
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {method_names()}")
    return _METHODS[name]


def method_names() -> list[str]:
    """Names of the registered methods, in registration order.

    Example:
        >>> method_names()[:4]
        ['dense', 'wanda', 'ria', 'teal']
    """
    return list(_METHODS)


def dense(model: torch.nn.Module, batches: Iterable[Any], budget: float = 1.0) -> PreparedModel:
    """The reference: the model itself, reading and holding all of its FFN weights.

    Example:
        >>> dense(model, [], 1.0).ffn_bytes.read_fraction
        1.0
    """
    compressed = compressed_bytes(model)
    if compressed is not None:  # a tardis checkpoint, evaluated as it is: its FFNs are not dense
        read, held, dense_total = compressed
        rest = dense_ffn_bytes(model)  # FFNs left dense (skip=), found as linears
        return PreparedModel(model, FFNBytes(read + rest, held + rest, dense_total + rest),
                             details={"method": "tardis checkpoint, as loaded"})
    total = dense_ffn_bytes(model)
    return PreparedModel(model, FFNBytes(float(total), total, total), details={"method": "dense"})


register_method("dense", dense, uses_budget=False)
register_method("wanda", wanda)
register_method("ria", ria)
register_method("teal", teal)
register_method("tardis", tardis)
