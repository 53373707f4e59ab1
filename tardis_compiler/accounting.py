"""Bytes accounting: the FFN weight bytes a token reads, dense or folded, in one place.

Everything that prices an FFN imports its formulas from here: calibration (the options a neuron
may take), the profile (bytes per token at the measured flag rate), the backend and ``explain``
(the dense FFN's bytes), and the evaluation harness (the pruning baselines' bitmask format).

- dense FFNs: ``ffn_bytes_per_token(..., guard="dense")`` (plain), ``gated_dense_bytes`` (gated);
- folded FFNs, as the pack lays them out (``runtime/layout.py``, re-exported here):
  ``folded_matrix_bytes`` (Wf, read once per token), ``always_read_bytes`` (the float32 bf),
  ``exact_neuron_bytes`` (one neuron on the exact path), ``guard_neuron_bytes`` and ``guard_bytes``
  (what the guard reads per guarded neuron and once); ``ffn_bytes_per_token`` adds them up for a
  plain FFN with every neuron guarded (a coverage fit), ``mix_bytes_per_token`` for a fitted mix;
- pruned matrices (Wanda, RIA): ``bitmask_bytes``, and ``density_for_budget`` for a budget given
  as a fraction of dense bytes (``check_budget``, ``InvalidBudget``).

Imports only ``runtime/layout.py`` and the predictor types: every layer above may import it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .runtime.layout import always_read_bytes, exact_neuron_bytes, folded_matrix_bytes, guard_neuron_bytes, mix_bytes
from .runtime.svd_predictor import SVDPredictor

if TYPE_CHECKING:
    from .runtime.guard import LowBitGuard

__all__ = [
    "InvalidBudget", "always_read_bytes", "bitmask_bytes", "check_budget", "density_for_budget",
    "exact_neuron_bytes", "ffn_bytes_per_token", "folded_matrix_bytes", "gated_dense_bytes", "guard_bytes",
    "guard_neuron_bytes", "mix_bytes_per_token",
]


def mix_bytes_per_token(measured: dict, corrected_neurons: float) -> float:
    """Bytes a fitted mix reads per token when ``corrected_neurons`` take the exact path: what it
    reads whatever is flagged, the always-exact neurons at ``exact_cost`` and the flagged guarded
    ones at ``guarded_cost`` (less with int8 bundles). ``measured``: the guard's stats a
    calibration recorded (``calibrate/policy.policy_measurements``).

    Example:
        >>> mix_bytes_per_token({"fixed_bytes": 100, "exact_cost": 10, "guarded_cost": 4, "always_neurons": 2}, 5)
        132
    """
    exact = measured["exact_cost"]  # profiles from before int8 bundles have no guarded_cost
    return mix_bytes(measured["fixed_bytes"], exact, measured.get("guarded_cost", exact),
                     measured.get("always_neurons", 0), corrected_neurons)


def ffn_bytes_per_token(d_in: int, d_hidden: int, d_out: int, elem_bytes: int, has_bias: bool,
                        guard: str = "dense", corrected_rate: float = 0.0, guard_bytes: int = 0) -> float:
    """Plain FFN weight bytes read per token at batch 1, dense (``guard="dense"``) or folded with
    every neuron guarded (a coverage fit), as the pack lays them out (``runtime/layout.py``).

    Folded: Wf and the float32 bf, the guard (``guard_bytes``: the low-bit rows and scales; the full
    W1 for ``guard="exact"``) and each neuron's float32 band, and for each corrected neuron its
    bundle [W1 row | W2 column] and four floats.

    Example:
        >>> ffn_bytes_per_token(384, 1536, 384, 4, True)   # MiniLM FFN, fp32
        4726272
    """
    m = d_hidden
    if guard == "dense":
        return (m * d_in + m * d_out + (m + d_out) * has_bias) * elem_bytes
    folded = folded_matrix_bytes(d_in, d_out, elem_bytes) + always_read_bytes(d_out)
    if guard == "exact":
        guard_bytes = m * d_in * elem_bytes
    if guard != "all":
        guard_bytes += 8 * m
    return folded + guard_bytes + corrected_rate * m * exact_neuron_bytes("plain", d_in, d_out, elem_bytes)


def gated_dense_bytes(d_in: int, m: int, d_out: int, elem_bytes: int, gate_up_bias: bool, down_bias: bool) -> int:
    """Weight bytes a dense gated FFN reads per token.

    Example:
        >>> gated_dense_bytes(576, 1536, 576, 4, False, False)   # SmolLM2-135M, fp32
        10616832
    """
    return (2 * m * d_in + m * d_out + 2 * m * gate_up_bias + d_out * down_bias) * elem_bytes


def guard_bytes(predictor: LowBitGuard | SVDPredictor | None, d_in: int, elem: int) -> tuple[float, float]:
    """Bytes the guard reads per token: (per guarded neuron, once for all of them), as the pack
    lays them out (``runtime/layout.py``): a low-bit row and its scales, the full row for "exact",
    or the SVD's Q row, plus the neuron's band; the SVD's P (r x d_in, float32) once.

    Example:
        >>> guard_bytes(None, 16, 4)
        (72.0, 0.0)
    """
    if isinstance(predictor, SVDPredictor):
        return float(guard_neuron_bytes("svd", d_in, elem, rank=predictor.rank)), float(predictor.rank * d_in * 4)
    if predictor is None:
        return float(guard_neuron_bytes("exact", d_in, elem)), 0.0
    return float(guard_neuron_bytes(predictor.kernel, d_in, elem, predictor.group_size)), 0.0


# --- pruned matrices: the bitmask format ----------------------------------------------------------
# Convention for unstructured sparsity (Wanda, RIA): a pruned matrix is stored as a *bitmask*
# format, one bit per dense position plus the kept values at the weight's dtype. At float32 that is
# ``density * 4 + 1/8`` bytes per dense position, so 50% of the bytes means density 0.46875, not 0.5.
# A matrix with nothing pruned stays dense (no mask). Biases are not counted (< 0.3% of FFN bytes).


class InvalidBudget(ValueError):
    """A budget (fraction of dense FFN weight bytes read per token) outside (0, 1], or one a
    format cannot reach.

    Example:
        >>> isinstance(InvalidBudget("budget 1.5"), ValueError)
        True
    """


def check_budget(budget: float) -> float:
    """Return ``budget`` as a float if it lies in (0, 1], else raise ``InvalidBudget``.

    Example:
        >>> check_budget(0.5)
        0.5
    """
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise InvalidBudget(f"budget must be a number in (0, 1], got {budget!r}") from None
    if not 0.0 < value <= 1.0:
        raise InvalidBudget(
            f"budget must be in (0, 1] (a fraction of the dense model's FFN weight bytes read per "
            f"token; 0.5 means half), got {budget!r}. Pass e.g. --budgets 0.3 0.5 0.7."
        )
    return value


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
