"""Optional run-time counters of the fused FFN op: tokens seen, neurons flagged, dense fallbacks.

Off by default (the op then does no extra work). ``explain`` turns them on to report the flag rate
measured on the user's inputs next to the one measured at calibration.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator


@dataclasses.dataclass
class FFNCounters:
    """Counters of one FFN. ``flagged`` counts (token, neuron) flags; ``corrected`` counts neurons
    that took the exact path (the union over a call's tokens), summed over calls. Calls that ran
    the dense FFN (``dense_above``) are counted apart: they flag nothing."""

    calls: int = 0
    tokens: int = 0
    neurons: int = 0
    flagged: int = 0
    corrected: int = 0
    dense_calls: int = 0
    dense_tokens: int = 0

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
        c.neurons = neurons
        if dense:
            c.dense_calls += 1
            c.dense_tokens += tokens
            return
        c.calls += 1
        c.tokens += tokens
        c.flagged += flagged
        c.corrected += corrected


class _Active(threading.local):
    """Active collectors, per thread: a model run in one thread counts into that thread's."""

    def __init__(self) -> None:
        self.stack: list[RuntimeStats] = []


_ACTIVE = _Active()


def active_stats() -> RuntimeStats | None:
    """The innermost active collector of this thread, or None (the common, zero-cost case)."""
    stack = _ACTIVE.stack
    return stack[-1] if stack else None


def start_collecting(stats: RuntimeStats) -> None:
    """Make ``stats`` this thread's innermost collector (``collect_stats`` does this for a block)."""
    _ACTIVE.stack.append(stats)


def stop_collecting(stats: RuntimeStats) -> None:
    """Undo ``start_collecting(stats)`` (no-op if it is not active)."""
    if stats in _ACTIVE.stack:
        _ACTIVE.stack.remove(stats)


@contextlib.contextmanager
def collect_stats() -> Iterator[RuntimeStats]:
    """Count what the fused FFN ops do inside the block (in this thread).

    Example:
        >>> with collect_stats() as stats:
        ...     pass  # run a tardis-compiled model here
        >>> stats.ffns
        {}
    """
    stats = RuntimeStats()
    start_collecting(stats)
    try:
        yield stats
    finally:
        stop_collecting(stats)
