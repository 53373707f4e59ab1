"""Bytes accounting: the FFN weight bytes a token reads, dense or folded, in one place.

Everything that prices an FFN imports its formulas from here: calibration (the options a neuron
may take), the profile (bytes per token at the measured flag rate), the backend and ``explain``
(the dense FFN's bytes), and the evaluation harness (the pruning baselines' bitmask format).

- dense FFNs: ``dense_ffn_bytes`` (any kind), ``ffn_bytes_per_token(..., guard="dense")`` (plain),
  ``gated_dense_bytes`` (gated);
- folded FFNs, as the pack lays them out (``runtime/layout.py``, re-exported here):
  ``folded_matrix_bytes`` (Wf, read once per token), ``always_read_bytes`` (the float32 bf),
  ``exact_neuron_bytes`` (one neuron on the exact path), ``guard_neuron_bytes`` and ``guard_bytes``
  (what the guard reads per guarded neuron and once); ``ffn_bytes_per_token`` adds them up for a
  plain FFN with every neuron guarded (a coverage fit), ``mix_bytes_per_token`` for a fitted mix;
- what a pack holds (``Layout.resident_bytes``, linear in the mix for calibration's memory cap):
  ``held_neuron_bytes`` (one neuron with a bundle), ``held_fixed_bytes`` (whatever the mix),
  ``held_bytes`` (both, for a calibration's guard);
- pruned matrices (Wanda, RIA): ``bitmask_bytes``, and ``density_for_budget`` for a budget given
  as a fraction of dense bytes (``check_budget``, ``InvalidBudget``).

Imports only ``runtime/layout.py`` and the predictor types: every layer above may import it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .runtime.layout import (ALIGN_BYTES, META_FIELDS, NEURON_FLOATS, QSCALES, always_read_bytes, bundle_row,
                             bundle_stride, exact_neuron_bytes, folded_matrix_bytes, guard_neuron_bytes,
                             guard_row_bytes, int4_row_bytes, mix_bytes, quantized_bundle_bytes, round_up)
from .runtime.ffn_kind import FFNKind, ffn_kind
from .runtime.svd_predictor import SVDPredictor

if TYPE_CHECKING:
    from .runtime.guard import LowBitGuard

__all__ = [
    "InvalidBudget", "always_read_bytes", "bitmask_bytes", "check_budget", "dense_ffn_bytes", "density_for_budget",
    "exact_neuron_bytes", "ffn_bytes_per_token", "folded_matrix_bytes", "gated_dense_bytes", "guard_bytes",
    "guard_neuron_bytes", "held_bytes", "held_fixed_bytes", "held_neuron_bytes", "mix_bytes_per_token",
    "NEURON_INDEX_BYTES",
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
                        guard: str = "dense", corrected_rate: float = 0.0, guard_bytes: int = 0,
                        weights: str = "dense") -> float:
    """Plain FFN weight bytes read per token at batch 1, dense (``guard="dense"``) or folded with
    every neuron guarded (a coverage fit), as the pack lays them out (``runtime/layout.py``).

    Folded: Wf and the float32 bf, the guard (``guard_bytes``: the low-bit rows and scales; the full
    W1 for ``guard="exact"``) and each neuron's float32 band, and for each corrected neuron its
    bundle [W1 row | W2 column] and four floats.

    ``weights="int8"``: the dense FFN of int8 weights (a quantized pack's reference), its codes and a
    float32 scale per W1 row and W2 column (``runtime/quantize.py``); ``"int4"``: its int4 rows with
    their group scales; biases in the model's dtype.

    Example:
        >>> ffn_bytes_per_token(384, 1536, 384, 4, True)   # MiniLM FFN, fp32
        4726272
        >>> ffn_bytes_per_token(384, 1536, 384, 4, True, weights="int8")
        1195008
    """
    m = d_hidden
    if guard == "dense":
        return dense_ffn_bytes("plain", d_in, m, d_out, elem_bytes, has_bias, has_bias, weights)
    folded = folded_matrix_bytes(d_in, d_out, elem_bytes) + always_read_bytes(d_out)
    if guard == "exact":
        guard_bytes = m * d_in * elem_bytes
    if guard != "all":
        guard_bytes += 8 * m
    return folded + guard_bytes + corrected_rate * m * exact_neuron_bytes("plain", d_in, d_out, elem_bytes)


def gated_dense_bytes(d_in: int, m: int, d_out: int, elem_bytes: int, gate_up_bias: bool, down_bias: bool,
                      weights: str = "dense") -> int:
    """Weight bytes a dense gated FFN reads per token; ``weights="int8"``: of its int8 weights (codes
    and a float32 scale per output channel of W_g, W_u and W_d; biases in the model's dtype).

    Example:
        >>> gated_dense_bytes(576, 1536, 576, 4, False, False)   # SmolLM2-135M, fp32
        10616832
        >>> gated_dense_bytes(576, 1536, 576, 2, False, False, "int8")
        2668800
    """
    return dense_ffn_bytes("gated", d_in, m, d_out, elem_bytes, gate_up_bias, down_bias, weights)


def dense_ffn_bytes(kind: str | FFNKind, d_in: int, m: int, d_out: int, elem_bytes: int, input_bias: bool,
                    output_bias: bool, weights: str = "dense") -> int:
    """Weight bytes a dense FFN of ``kind`` reads per token: its input linears' (m, d_in) weights, its
    output linear's (d_out, m), and their biases; ``weights="int8"``: int8 codes and a float32 scale
    per output channel of each linear; ``"int4"``: each such row in int4 with its group scales
    (``layout.int4_row_bytes``); biases in the model's dtype.

    Example:
        >>> dense_ffn_bytes("gated", 576, 1536, 576, 2, False, False)   # SmolLM2-135M, bf16
        5308416
        >>> dense_ffn_bytes("plain", 384, 1536, 384, 4, True, True) == ffn_bytes_per_token(384, 1536, 384, 4, True)
        True
        >>> dense_ffn_bytes("gated", 576, 1536, 576, 2, False, False, "int4")   # 3 x 1536 rows of 360 bytes
        1658880
    """
    n_inputs = ffn_kind(kind).n_inputs
    biases = (n_inputs * m * input_bias + d_out * output_bias) * elem_bytes
    if weights == "int4":
        return n_inputs * m * int4_row_bytes(d_in) + m * int4_row_bytes(d_out) + biases
    if weights == "int8":
        return n_inputs * m * d_in + m * d_out + 4 * (n_inputs * m + d_out) + biases
    return n_inputs * m * d_in * elem_bytes + m * d_out * elem_bytes + biases


def guard_bytes(predictor: LowBitGuard | SVDPredictor | None, d_in: int, elem: int,
                weights: str = "dense") -> tuple[float, float]:
    """Bytes the guard reads per token: (per guarded neuron, once for all of them), as the pack
    lays them out (``runtime/layout.py``): a low-bit row and its scales, the full row for "exact"
    (a quantized pack's: its codes and scales), or the SVD's Q row, plus the neuron's band; the
    SVD's P (r x d_in, float32) once.

    Example:
        >>> guard_bytes(None, 16, 4)
        (72.0, 0.0)
    """
    if isinstance(predictor, SVDPredictor):
        return float(guard_neuron_bytes("svd", d_in, elem, rank=predictor.rank)), float(predictor.rank * d_in * 4)
    if predictor is None:
        return float(guard_neuron_bytes("exact", d_in, elem, weights=weights)), 0.0
    return float(guard_neuron_bytes(predictor.kernel, d_in, elem, predictor.group_size)), 0.0


# --- bytes held: what a pack keeps in memory (``Layout.resident_bytes``), per neuron and fixed ----
#: Bytes of one bundle's entry in a pack's ``neurons`` index (int64): held for reports, never read.
NEURON_INDEX_BYTES = 8
#: Alignment of the guard's scales in the ``guard`` buffer (``Layout.off_gscales``).
_SCALES_ALIGN = 16


def _float_bytes(elem_bytes: int) -> int:
    return 8 if elem_bytes == 8 else 4  # a float64 pack keeps its floats in float64, any other float32


def held_neuron_bytes(kind: str, d_in: int, d_out: int, elem_bytes: int, guard: str = "none",
                      bundles: str = "dense", group: int = 64, rank: int = 0, weights: str = "dense") -> int:
    """Bytes a pack holds for one neuron with a bundle, as ``Layout.resident_bytes`` counts them:
    its bundle padded to 64 bytes, its four floats and its ``neurons`` entry; for a guarded one
    (``guard`` not "none") also its guard codes and scales (none for "exact", which reads the
    bundle's first row) and its band, and with ``bundles="int8"`` its bundle as int8 codes (padded
    to 64 bytes) and three scales. An always-exact neuron's bundle stays dense whatever ``bundles``,
    unless ``weights`` is "int8" (every bundle int8) or "int4" (every bundle int4 with its group
    scales, padded to 64 bytes).

    Example:
        >>> held_neuron_bytes("gated", 32, 32, 4)                    # always exact, fp32: 384 + 16 + 8
        408
        >>> held_neuron_bytes("gated", 32, 32, 4, "int4", "int8", group=32)   # 20 + 8 + 128 + 12 + 16 + 8
        192
    """
    floats = _float_bytes(elem_bytes)
    if weights == "int4":
        bundle = round_up(quantized_bundle_bytes(kind, d_in, d_out, "int4"), ALIGN_BYTES)
    elif (guard != "none" and bundles == "int8") or weights == "int8":
        bundle = round_up(bundle_row(kind, d_in, d_out), ALIGN_BYTES) + floats * QSCALES
    else:
        bundle = bundle_stride(kind, d_in, d_out, elem_bytes) * elem_bytes
    held = bundle + floats * NEURON_FLOATS + NEURON_INDEX_BYTES
    if guard != "none":
        held += guard_row_bytes(guard, d_in, group, rank) + 2 * floats  # codes and scales, the band
    return held


def held_fixed_bytes(d_in: int, d_out: int, elem_bytes: int, has_wf: bool, guard: str = "none",
                     bundles: str = "dense", rank: int = 0, weights: str = "dense") -> int:
    """Bytes a pack holds whatever its mix, at most: Wf (padded to 64 bytes), the folded bias,
    svd's P, the ``meta`` tensor, and the padding that aligns the guard's scales and the int8
    bundles (an upper bound: it depends on how many neurons are guarded, so the price stays linear).

    Example:
        >>> held_fixed_bytes(32, 32, 4, True)                         # Wf + bf + meta
        4448
        >>> held_fixed_bytes(32, 32, 4, True, "int4", "int8") - 4448  # alignment of scales and bundles
        78
    """
    floats = _float_bytes(elem_bytes)
    if weights == "int8":  # Wf's codes and row scales (the int8 region starts 64-byte aligned), the output scales
        held = d_out * d_in + floats * d_out if has_wf else 0
        held += ALIGN_BYTES - 1 + floats * d_out
    elif weights == "int4":  # Wf's int4 rows with their group scales, after the aligned bundles
        held = d_out * int4_row_bytes(d_in) if has_wf else 0
        held += ALIGN_BYTES - 1
    else:
        held = round_up(d_out * d_in * elem_bytes, ALIGN_BYTES) if has_wf else 0
    held += floats * d_out + len(META_FIELDS) * 8
    if guard == "svd":
        held += floats * rank * d_in
    if guard not in ("none", "exact"):  # the scales follow the codes at a 16-byte boundary
        held += _SCALES_ALIGN - 1
    if guard != "none" and bundles == "int8" and weights == "dense":
        held += ALIGN_BYTES - 1
    return held


def held_bytes(predictor: LowBitGuard | SVDPredictor | None, kind: str, d_in: int, d_out: int, elem_bytes: int,
               bundles: str, has_wf: bool, weights: str = "dense") -> tuple[float, float, float]:
    """What a pack priced for ``predictor`` holds: (per always-exact neuron, per guarded neuron,
    whatever the mix). None is the "exact" guard (the bundles' own rows: they stay dense).

    Example:
        >>> held_bytes(None, "gated", 32, 32, 4, "int8", True)
        (408.0, 416.0, 4448.0)
    """
    if isinstance(predictor, SVDPredictor):
        guard, group, rank = "svd", 64, predictor.rank
    elif predictor is None:
        guard, group, rank, bundles = "exact", 64, 0, "dense"
    else:
        guard, group, rank = predictor.kernel, predictor.group_size, 0
    return (float(held_neuron_bytes(kind, d_in, d_out, elem_bytes, weights=weights)),
            float(held_neuron_bytes(kind, d_in, d_out, elem_bytes, guard, bundles, group, rank, weights)),
            float(held_fixed_bytes(d_in, d_out, elem_bytes, has_wf, guard, bundles, rank, weights)))


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
