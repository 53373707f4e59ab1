"""FFN weight bytes of a method: what it reads per token and what it keeps resident, and the
meter that measures input-dependent reads.

The byte formulas live in ``tardis_compiler/accounting.py``, with the sparse format convention
that turns a pruning mask into bytes (``bitmask_bytes``, ``density_for_budget``: re-exported here,
where the evaluation harness has always found them).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import torch

from ..accounting import bitmask_bytes, density_for_budget

__all__ = ["FFNBytes", "PreparedModel", "ReadMeter", "bitmask_bytes", "density_for_budget"]


@dataclasses.dataclass(frozen=True)
class FFNBytes:
    """FFN weight bytes of a prepared model, next to the dense model's.

    Args:
        read_per_token: FFN weight bytes read to process one token (what decode speed follows).
        resident: FFN weight bytes held in memory.
        dense: the dense model's FFN weight bytes (it reads and holds all of them).

    Example:
        >>> FFNBytes(read_per_token=50.0, resident=100, dense=100).read_fraction
        0.5
    """

    read_per_token: float
    resident: int
    dense: int

    @property
    def read_fraction(self) -> float:
        """``read_per_token / dense``."""
        return self.read_per_token / self.dense

    @property
    def resident_fraction(self) -> float:
        """``resident / dense``."""
        return self.resident / self.dense

    def to_dict(self) -> dict[str, float]:
        """JSON form with both fractions spelled out."""
        return {"ffn_read_bytes_per_token": self.read_per_token,
                "ffn_read_fraction": self.read_fraction,
                "ffn_resident_bytes": self.resident,
                "ffn_resident_fraction": self.resident_fraction,
                "ffn_dense_bytes": self.dense}


@runtime_checkable
class ReadMeter(Protocol):
    """Counts bytes actually read while the model runs (for input-dependent methods such as
    activation sparsity or a guarded fold). The harness resets it before the perplexity text and
    reads it afterwards, replacing the calibration-time estimate with the measured value."""

    def reset(self) -> None: ...

    def read_per_token(self) -> float: ...


@dataclasses.dataclass
class PreparedModel:
    """What a method returns: the model to evaluate and its FFN byte accounting.

    Args:
        model: the model to evaluate (never the caller's model mutated in place).
        ffn_bytes: bytes accounting; for input-dependent methods, the calibration-time estimate.
        meter: optional ``ReadMeter`` measuring bytes read on the evaluation text.
        details: method-specific facts worth recording (density, thresholds, ...), JSON-able.
    """

    model: torch.nn.Module
    ffn_bytes: FFNBytes
    meter: ReadMeter | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
