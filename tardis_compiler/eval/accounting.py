"""FFN weight bytes: what a method reads per token and what it keeps resident, and the sparse
format convention that turns a pruning mask into bytes.

Convention for unstructured sparsity (Wanda, RIA): a pruned matrix is stored as a *bitmask*
format, one bit per dense position plus the kept values at the weight's dtype. At float32 that is
``density * 4 + 1/8`` bytes per dense position, so 50% of the bytes means density 0.46875, not 0.5.
A matrix with nothing pruned stays dense (no mask). Biases are not counted (< 0.3% of FFN bytes).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import InvalidBudget, check_budget


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


def bitmask_bytes(kept: int, positions: int, element_size: int) -> int:
    """Bytes of a matrix in bitmask format: kept values plus one bit per dense position (rounded
    up to whole bytes); a matrix with every position kept is stored dense.

    Example:
        >>> bitmask_bytes(kept=50, positions=100, element_size=4)
        213
    """
    if kept >= positions:
        return positions * element_size
    return kept * element_size + (positions + 7) // 8


def density_for_budget(budget: float, element_size: int) -> float:
    """Fraction of weights to keep so a bitmask-format matrix reads ``budget`` of its dense bytes.

    Example:
        >>> density_for_budget(0.5, element_size=4)
        0.46875
        >>> density_for_budget(1.0, element_size=4)
        1.0
    """
    budget = check_budget(budget)
    if budget >= 1.0:
        return 1.0
    overhead = 1.0 / (8 * element_size)  # the mask's bit per position, relative to dense bytes
    density = budget - overhead
    if density <= 0.0:
        raise InvalidBudget(
            f"budget {budget} is at or below the bitmask format's own cost ({overhead:.4f} of dense "
            f"bytes at {element_size}-byte weights): no weights could be kept. Use a larger budget."
        )
    return density
