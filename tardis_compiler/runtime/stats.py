"""Optional run-time counters of the fused FFN op: tokens seen, neurons flagged, dense fallbacks.

Off by default (the op then does no extra work). ``explain`` turns them on to report the flag rate
measured on the user's inputs next to the one measured at calibration.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator


@dataclasses.dataclass
class FFNCounters:
    """Counters of one FFN. ``flagged`` counts (token, neuron) flags; ``corrected`` counts neurons
    that took the exact path (the union over a call's tokens), summed over calls."""

    calls: int = 0
    tokens: int = 0
    neurons: int = 0
    flagged: int = 0
    corrected: int = 0
    dense_calls: int = 0

    @property
    def flag_rate(self) -> float:
        """Mean fraction of neurons flagged per token."""
        return self.flagged / max(1, self.tokens * self.neurons)

    @property
    def corrected_rate(self) -> float:
        """Mean fraction of neurons on the exact path per call (union over the call's tokens)."""
        return self.corrected / max(1, self.calls * self.neurons)


class RuntimeStats:
    """Per-FFN counters collected while active (see ``collect_stats``)."""

    def __init__(self) -> None:
        self.ffns: dict[str, FFNCounters] = {}

    def record(self, name: str, tokens: int, neurons: int, flagged: int, corrected: int, dense: bool) -> None:
        c = self.ffns.setdefault(name, FFNCounters())
        c.calls += 1
        c.tokens += tokens
        c.neurons = neurons
        c.flagged += flagged
        c.corrected += corrected
        c.dense_calls += int(dense)


_ACTIVE: list[RuntimeStats] = []


def active_stats() -> RuntimeStats | None:
    """The innermost active collector, or None (the common, zero-cost case)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def collect_stats() -> Iterator[RuntimeStats]:
    """Count what the fused FFN ops do inside the block.

    Example:
        >>> with collect_stats() as stats:
        ...     pass  # run a tardis-compiled model here
        >>> stats.ffns
        {}
    """
    stats = RuntimeStats()
    _ACTIVE.append(stats)
    try:
        yield stats
    finally:
        _ACTIVE.remove(stats)
