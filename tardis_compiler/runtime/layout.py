"""The pack layout: what the fused FFN kernel reads, where, and how many bytes it is.

One FFN's pack is four buffers (see ``runtime/pack.py``, which fills them):

* ``weights`` (the model's dtype): the folded matrix ``Wf`` (d_out, d_in), then one contiguous
  *bundle* per neuron that can take the exact path: ``[W1 row | W2 column]`` for a plain FFN,
  ``[W_g row | W_u row | W_d column]`` for a gated one, each padded to a 64-byte stride. Bundles
  ``[0, k_guard)`` are the guarded neurons, in guard order; ``[k_guard, k_guard + k_always)`` the
  always-exact ones. Neurons that are never computed exactly (folded unguarded, dropped) have none.
* ``guard`` (uint8): the guard's codes of the guarded neurons' first rows, then their scales; with
  int8 bundles (``bundles="int8"``), then the guarded neurons' bundles as int8 codes, each padded to
  64 bytes (``weights`` then holds only the always-exact bundles). With quantized weights
  (``weights="int8"`` or ``"int4"``: a quantized pack) every bundle is there, guarded then
  always-exact, and ``Wf``'s codes (d_out rows) follow them: ``weights`` is then empty. An int4 row
  (``int4_row_bytes``) is its codes, two per byte in groups of ``WEIGHT_GROUP`` as the sub-byte
  guards pack them (unsigned, padded to 4 bytes), then a bfloat16 (scale, minimum) pair per group:
  a bundle is its first, up and output rows in that form, back to back.
* ``floats`` (float32): the folded bias ``bf`` (d_out), each guarded neuron's flag band with the
  bias taken out (lo, hi), four floats per bundle (first bias, up bias, slope, intercept), the
  svd guard's projection ``P`` (rank, d_in), and with int8 bundles three scales per int8 bundle
  (first row, up row, output column; a plain FFN's second is unused), then with int8 weights one
  scale per row of ``Wf`` and one per output channel of the bundles' output columns, whose own
  scale is then 1 (``quantize.py``; int4 rows carry their scales in ``guard``).
* ``meta`` (int64): the fields of ``META_FIELDS``: shapes, codes and offsets.

This module is the one home of those sizes: the pack builder, the kernel's checks
(``ffn_kernel.cpp`` recomputes them), calibration's cost model and the reports all use it.
"""
from __future__ import annotations

import dataclasses

import torch

from .ffn_kind import KINDS as FFN_KINDS, ffn_kind

META_FIELDS = ("MAGIC", "VERSION", "KIND", "ACT", "DTYPE", "D_IN", "D_OUT", "M", "K_GUARD", "K_ALWAYS", "GUARD",
               "GROUP", "RANK", "STRIDE", "HAS_WF", "OFF_BUNDLES", "OFF_GSCALES", "OFF_BF", "OFF_BANDS",
               "OFF_NEURON", "OFF_P", "N_WEIGHTS", "N_GUARD", "N_FLOATS", "BUNDLES", "QSTRIDE", "OFF_QBUNDLES",
               "OFF_QSCALES")
FIELD = {name: i for i, name in enumerate(META_FIELDS)}
MAGIC = 0x7A4D5446
LAYOUT_VERSION = 2
#: How the guarded neurons' bundles are stored: in the model's dtype (exact), or int8 with a scale per
#: row and column (a quarter of float32's bytes, half of bfloat16's; always-exact bundles stay dense);
#: int4 only in an int4 quantized pack.
BUNDLE_ENCODINGS = {"dense": 0, "int8": 1, "int4": 2}
#: How Wf and the always-exact bundles are stored: in the model's dtype, or quantized (a quantized
#: pack: every weight int8, one scale per row of Wf and per row / column of a bundle; or every weight
#: int4 in groups of ``WEIGHT_GROUP``). The meta's BUNDLES field holds both choices
#: (``_BUNDLES_CODES``): quantized weights imply bundles of the same encoding.
WEIGHT_ENCODINGS = ("dense", "int8", "int4")
QUANTIZED_WEIGHTS = ("int8", "int4")
_BUNDLES_CODES = {("dense", "dense"): 0, ("int8", "dense"): 1, ("int8", "int8"): 2, ("int4", "int4"): 3}
QSCALES = 3  # float scales per int8 bundle (int4 rows hold theirs in the guard buffer)
#: Elements per (scale, minimum) group of an int4 weight row: Q4_0's and torchao's smallest group.
WEIGHT_GROUP = 32
KINDS = {name: kind.code for name, kind in FFN_KINDS.items()}  # the meta's KIND field
#: Activations the kernel evaluates itself (others run the torch path).
KERNEL_ACTIVATIONS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "quick_gelu": 4}
#: Guard encodings: a low-bit copy of the guarded first rows (int8: per-row scale; int4/int2:
#: per-group scale and minimum), "exact" (the bundle's own first row), "svd" (rank-r factors).
GUARD_ENCODINGS = {"none": 0, "int8": 1, "int4": 2, "int2": 3, "exact": 4, "svd": 5}
DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # the kernel's dtypes; others run the torch path
#: Dtypes a pack can be laid out for (float16 and float64 run the torch path).
PACK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "float64": torch.float64}
NEURON_FLOATS = 4
ALIGN_BYTES = 64
#: Largest d_in, d_out, m and group a pack may have (the kernel refuses more, too): far above any
#: real FFN, and small enough that no size or offset product overflows int64.
MAX_DIM = 1 << 20


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``. Example: ``round_up(70, 64) == 128``."""
    return (n + multiple - 1) // multiple * multiple


def bundle_row(kind: str, d_in: int, d_out: int) -> int:
    """Elements of one neuron's bundle: its first row(s) and its output column.

    Example:
        >>> bundle_row("gated", 576, 576), bundle_row("plain", 384, 384)
        (1728, 768)
    """
    return ffn_kind(kind).bundle_row(d_in, d_out)


def bundle_stride(kind: str, d_in: int, d_out: int, elem_bytes: int) -> int:
    """Elements between bundles: the row padded to 64 bytes."""
    return round_up(bundle_row(kind, d_in, d_out), ALIGN_BYTES // elem_bytes)


def group_sizes(d_in: int, group: int) -> list[int]:
    """Sizes of the quantization groups along a row: ``group`` each, the last one partial."""
    return [min(group, d_in - start) for start in range(0, d_in, group)]


def group_count(d_in: int, group: int) -> int:
    """Number of quantization groups along a row (``len(group_sizes(...))``, without the list)."""
    return (d_in + group - 1) // group


def guard_codes_bytes(encoding: str, d_in: int, group: int = 64, rank: int = 0) -> int:
    """Bytes of one guarded row's codes (svd: its float32 row of Q); scales are stored after all codes."""
    if encoding == "int8":
        return d_in
    if encoding in ("int4", "int2"):
        bits = 4 if encoding == "int4" else 2
        full, rest = divmod(d_in, group)  # closed form: a hostile d_in must not build a list
        return full * ((group * bits + 7) // 8) + (rest * bits + 7) // 8
    if encoding == "svd":
        return 4 * rank
    return 0


def guard_scale_bytes(encoding: str, d_in: int, group: int = 64) -> int:
    """Bytes of one guarded row's scales: a float32 scale (int8), a bf16 scale and minimum per group."""
    if encoding == "int8":
        return 4
    if encoding in ("int4", "int2"):
        return 4 * group_count(d_in, group)
    return 0


def guard_row_bytes(encoding: str, d_in: int, group: int = 64, rank: int = 0) -> int:
    """Bytes of one guarded neuron's codes and scales (not its band).

    Example:
        >>> guard_row_bytes("int8", 576), guard_row_bytes("int4", 576, 64), guard_row_bytes("int2", 576, 64)
        (580, 324, 180)
    """
    return guard_codes_bytes(encoding, d_in, group, rank) + guard_scale_bytes(encoding, d_in, group)


def int4_codes_bytes(n: int) -> int:
    """Bytes of an int4 weight row's codes: two per byte per group, padded to 4 bytes."""
    return round_up(guard_codes_bytes("int4", n, WEIGHT_GROUP), 4)


def int4_row_bytes(n: int) -> int:
    """Bytes of an int4 weight row of ``n`` elements: its codes, then a bf16 (scale, minimum) pair
    per group of ``WEIGHT_GROUP``.

    Example:
        >>> int4_row_bytes(576), int4_row_bytes(40)    # 18 groups: 288 + 72; 2 groups: 20 + 8
        (360, 28)
    """
    return int4_codes_bytes(n) + guard_scale_bytes("int4", n, WEIGHT_GROUP)


def quantized_bundle_bytes(kind: str, d_in: int, d_out: int, encoding: str) -> int:
    """Bytes of one quantized bundle's codes (int4: and its group scales), unpadded.

    Example:
        >>> quantized_bundle_bytes("gated", 576, 576, "int8"), quantized_bundle_bytes("gated", 576, 576, "int4")
        (1728, 1080)
    """
    if encoding == "int4":
        return ffn_kind(kind).n_inputs * int4_row_bytes(d_in) + int4_row_bytes(d_out)
    return bundle_row(kind, d_in, d_out)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shapes, counts and offsets of one pack: the ``meta`` tensor in readable form."""

    kind: str
    activation: str
    dtype: torch.dtype
    d_in: int
    d_out: int
    m: int
    k_guard: int
    k_always: int
    guard: str
    group: int
    rank: int
    has_wf: bool
    bundles: str = "dense"
    weights: str = "dense"

    def __post_init__(self) -> None:
        # Checked before any size is computed: a layout may come from an untrusted config.json.
        _choice(self.kind, KINDS, "kind")
        _choice(self.guard, GUARD_ENCODINGS, "guard")
        _choice(self.bundles, BUNDLE_ENCODINGS, "bundles")
        _choice(self.weights, dict.fromkeys(WEIGHT_ENCODINGS), "weights")
        if not isinstance(self.activation, str) or not self.activation:
            raise ValueError(f"activation must be a rule name, got {self.activation!r}")
        if self.dtype not in PACK_DTYPES.values():
            raise ValueError(f"dtype must be one of {sorted(PACK_DTYPES)}, got {self.dtype!r}")
        for name in ("d_in", "d_out", "m", "group"):
            _integer(getattr(self, name), name, 1, MAX_DIM)
        _integer(self.k_guard, "k_guard", 0, self.m)
        _integer(self.k_always, "k_always", 0, self.m - self.k_guard)
        _integer(self.rank, "rank", 1 if self.guard == "svd" else 0, MAX_DIM if self.guard == "svd" else 0)
        if not isinstance(self.has_wf, bool):
            raise ValueError(f"has_wf must be a bool, got {self.has_wf!r}")
        if (self.guard == "none") != (self.k_guard == 0):
            raise ValueError(f"guard {self.guard!r} with {self.k_guard} guarded neurons: a pack has guard 'none' "
                             "exactly when no neuron is guarded")
        if self.weights in QUANTIZED_WEIGHTS and self.bundles != self.weights:
            raise ValueError(f"{self.weights} weights need {self.weights} bundles, got bundles {self.bundles!r}")
        if self.bundles == "int4" and self.weights != "int4":
            raise ValueError("int4 bundles exist only in an int4 quantized pack (weights 'int4')")
        # A quantized pack's "exact" guard reads its quantized first rows; int8 bundles beside dense
        # weights would leave the "exact" guard no dense first row to read.
        quantized_pack = self.weights in QUANTIZED_WEIGHTS
        if self.bundles in QUANTIZED_WEIGHTS and self.guard not in ("int8", "int4", "int2", "svd") and not quantized_pack:
            raise ValueError(f"int8 bundles need a low-bit or svd guard (the {self.guard!r} guard reads the "
                             "bundles' own first rows): use bundles='dense'")

    @property
    def k_bundles(self) -> int:
        """Neurons with a bundle (guarded + always exact)."""
        return self.k_guard + self.k_always

    @property
    def k_dense_bundles(self) -> int:
        """Bundles in ``weights``: all of them, with int8 bundles the always-exact ones, with
        quantized weights none."""
        return self.k_bundles - self.k_quant_bundles

    @property
    def k_quant_bundles(self) -> int:
        """Bundles stored quantized in ``guard`` (bundles ``[0, k_quant_bundles)``): every one with
        quantized weights, the guarded neurons' with int8 bundles, else none."""
        if self.weights in QUANTIZED_WEIGHTS:
            return self.k_bundles
        return self.k_guard if self.bundles == "int8" else 0

    @property
    def quant_wf(self) -> bool:
        """Whether Wf is held as quantized codes in ``guard`` (quantized weights), not in ``weights``."""
        return self.has_wf and self.weights in QUANTIZED_WEIGHTS

    @property
    def qscales(self) -> int:
        """Float scales per quantized bundle in ``floats``: three for int8, none for int4 (its rows
        carry their group scales)."""
        return QSCALES if self.bundles == "int8" else 0

    @property
    def qwf_row_bytes(self) -> int:
        """Bytes of one row of a quantized Wf in ``guard`` (int4: with its group scales)."""
        return int4_row_bytes(self.d_in) if self.weights == "int4" else self.d_in

    @property
    def qstride(self) -> int:
        """Bytes between quantized bundles: one padded to 64 bytes (0 without quantized bundles)."""
        if not self.k_quant_bundles:
            return 0
        return round_up(quantized_bundle_bytes(self.kind, self.d_in, self.d_out, self.bundles), ALIGN_BYTES)

    @property
    def elem_bytes(self) -> int:
        return torch.empty(0, dtype=self.dtype).element_size()

    @property
    def stride(self) -> int:
        return bundle_stride(self.kind, self.d_in, self.d_out, self.elem_bytes)

    @property
    def off_bundles(self) -> int:
        dense_wf = self.has_wf and not self.quant_wf
        return round_up(self.d_out * self.d_in if dense_wf else 0, ALIGN_BYTES // self.elem_bytes)

    @property
    def n_weights(self) -> int:
        return self.off_bundles + self.k_dense_bundles * self.stride

    @property
    def off_gscales(self) -> int:
        return round_up(self.k_guard * guard_codes_bytes(self.guard, self.d_in, self.group, self.rank), 16)

    @property
    def end_gscales(self) -> int:
        """End of the guard's scales in ``guard``."""
        return self.off_gscales + self.k_guard * guard_scale_bytes(self.guard, self.d_in, self.group)

    @property
    def off_qbundles(self) -> int:
        quantized = self.k_quant_bundles or self.quant_wf
        return round_up(self.end_gscales, ALIGN_BYTES) if quantized else self.end_gscales

    @property
    def off_qwf(self) -> int:
        """Start of Wf's codes in ``guard`` (quantized weights): right after the quantized bundles."""
        return self.off_qbundles + self.k_quant_bundles * self.qstride

    @property
    def n_guard(self) -> int:
        return self.off_qwf + (self.d_out * self.qwf_row_bytes if self.quant_wf else 0)

    @property
    def off_bands(self) -> int:
        return self.d_out

    @property
    def off_neuron(self) -> int:
        return self.off_bands + 2 * self.k_guard

    @property
    def off_p(self) -> int:
        return self.off_neuron + NEURON_FLOATS * self.k_bundles

    @property
    def off_qscales(self) -> int:
        return self.off_p + (self.rank * self.d_in if self.guard == "svd" else 0)

    @property
    def off_wfscales(self) -> int:
        """Start of Wf's per-row scales in ``floats`` (int8 weights): after the bundles' scales."""
        return self.off_qscales + self.qscales * self.k_quant_bundles

    @property
    def off_oscales(self) -> int:
        """Start of the output columns' per-channel scales in ``floats`` (int8 weights): after Wf's."""
        return self.off_wfscales + (self.d_out if self.quant_wf and self.weights == "int8" else 0)

    @property
    def n_floats(self) -> int:
        return self.off_oscales + (self.d_out if self.weights == "int8" else 0)

    def meta(self) -> torch.Tensor:
        """The int64 ``meta`` tensor the kernel reads."""
        values = {
            "MAGIC": MAGIC, "VERSION": LAYOUT_VERSION, "KIND": KINDS[self.kind],
            "ACT": KERNEL_ACTIVATIONS.get(self.activation, -1), "DTYPE": DTYPES.get(self.dtype, -1),
            "D_IN": self.d_in, "D_OUT": self.d_out, "M": self.m, "K_GUARD": self.k_guard,
            "K_ALWAYS": self.k_always, "GUARD": GUARD_ENCODINGS[self.guard], "GROUP": self.group,
            "RANK": self.rank, "STRIDE": self.stride, "HAS_WF": int(self.has_wf), "OFF_BUNDLES": self.off_bundles,
            "OFF_GSCALES": self.off_gscales, "OFF_BF": 0, "OFF_BANDS": self.off_bands,
            "OFF_NEURON": self.off_neuron, "OFF_P": self.off_p, "N_WEIGHTS": self.n_weights,
            "N_GUARD": self.n_guard, "N_FLOATS": self.n_floats, "BUNDLES": _BUNDLES_CODES[self.bundles, self.weights],
            "QSTRIDE": self.qstride, "OFF_QBUNDLES": self.off_qbundles, "OFF_QSCALES": self.off_qscales,
        }
        return torch.tensor([values[name] for name in META_FIELDS], dtype=torch.int64)

    @classmethod
    def from_meta(cls, meta: torch.Tensor, activation: str, dtype: torch.dtype) -> "Layout":
        """Read a ``meta`` tensor back (the activation's name and the dtype are not in it). Every
        field must be what ``meta()`` writes for the layout it describes: ValueError naming the
        first field that is not.

        Example:
            >>> lay = Layout("gated", "silu", torch.float32, 8, 8, 16, 4, 2, "int8", 8, 0, True)
            >>> Layout.from_meta(lay.meta(), "silu", torch.float32) == lay
            True
        """
        if not isinstance(meta, torch.Tensor) or meta.dtype != torch.int64 or meta.dim() != 1:
            raise ValueError("not a tardis FFN pack: its meta must be a 1-D int64 tensor")
        v = meta.tolist()
        if len(v) != len(META_FIELDS) or v[FIELD["MAGIC"]] != MAGIC:
            raise ValueError("not a tardis FFN pack: its meta tensor has the wrong length or magic number")
        if v[FIELD["VERSION"]] != LAYOUT_VERSION:
            raise ValueError(f"tardis pack layout version {v[FIELD['VERSION']]}, this package reads {LAYOUT_VERSION}")
        names = {"KIND": KINDS, "GUARD": GUARD_ENCODINGS, "BUNDLES": _BUNDLES_CODES, "HAS_WF": {False: 0, True: 1}}
        decoded = {}
        for field, table in names.items():
            by_code = {code: name for name, code in table.items()}
            if v[FIELD[field]] not in by_code:
                raise ValueError(f"tardis pack meta field {field} is {v[FIELD[field]]}, not one of {sorted(by_code)}")
            decoded[field] = by_code[v[FIELD[field]]]
        layout = cls(decoded["KIND"], activation, dtype, v[FIELD["D_IN"]], v[FIELD["D_OUT"]], v[FIELD["M"]],
                     v[FIELD["K_GUARD"]], v[FIELD["K_ALWAYS"]], decoded["GUARD"], v[FIELD["GROUP"]],
                     v[FIELD["RANK"]], decoded["HAS_WF"], *decoded["BUNDLES"])
        for name, want, got in zip(META_FIELDS, layout.meta().tolist(), v):
            if name == "N_FLOATS" and layout.weights == "int8" and got == want - layout.d_out:
                raise ValueError("this int8-weight pack was written by tardis_compiler 0.x before 2026-12-08, which "
                                 "scaled W_d per neuron; this version scales it per output channel and cannot read "
                                 "it: compress the dense model again (tardis compress ... --weights int8)")
            if want != got:
                raise ValueError(f"tardis pack meta field {name} is {got}, but its shapes and codes give {want}"
                                 + (f" (the {activation!r} activation, {dtype})" if name in ("ACT", "DTYPE") else ""))
        return layout

    def linear_shapes(self) -> list[tuple[int, int]]:
        """``nn.Linear`` weight shapes of the FFN's own linears, in its kind's order (the output one last).

        Example:
            >>> Layout("gated", "silu", torch.float32, 8, 6, 16, 0, 16, "none", 64, 0, False).linear_shapes()
            [(16, 8), (16, 8), (6, 16)]
        """
        return [(self.m, self.d_in)] * ffn_kind(self.kind).n_inputs + [(self.d_out, self.m)]

    # --- bytes: what the kernel reads per token and what the pack holds -----------------------
    def bundle_bytes(self) -> int:
        """Bytes the exact path reads for one always-exact neuron: its bundle (unpadded; int8 weights:
        codes and scales) and its four floats."""
        return exact_neuron_bytes(self.kind, self.d_in, self.d_out, self.elem_bytes, self.weights)

    def guarded_bundle_bytes(self) -> int:
        """Bytes the exact path reads for one flagged guarded neuron (int8 bundles: codes and scales)."""
        return exact_neuron_bytes(self.kind, self.d_in, self.d_out, self.elem_bytes, self.bundles)

    def fixed_bytes(self) -> int:
        """Bytes read per token whatever is flagged: Wf, bf (int8 weights: the output scales), the
        guard and the bands, svd's P."""
        wf = folded_matrix_bytes(self.d_in, self.d_out, self.elem_bytes, self.weights) if self.has_wf else 0
        guard = self.k_guard * (guard_row_bytes(self.guard, self.d_in, self.group, self.rank) + 8)
        if self.guard == "exact":  # the first rows of every guarded bundle
            guard += self.k_guard * first_row_bytes(self.d_in, self.elem_bytes, self.weights)
        p = self.rank * self.d_in * 4 if self.guard == "svd" else 0
        return wf + always_read_bytes(self.d_out, self.weights) + guard + p

    def bytes_per_token(self, corrected_neurons: float) -> float:
        """Bytes read per token (batch 1) when ``corrected_neurons`` take the exact path (the
        always-exact ones among them, every token)."""
        return mix_bytes(self.fixed_bytes(), self.bundle_bytes(), self.guarded_bundle_bytes(), self.k_always,
                         corrected_neurons)

    def resident_bytes(self) -> int:
        """Bytes the pack holds (padding included): its four buffers and the int64 ``neurons``
        index (one entry per bundle; reports read it, the kernel does not), the buffers of a
        ``TardisFFN``. Calibration prices the same bytes (``accounting.held_bytes``).

        Example:
            >>> Layout("plain", "relu", torch.float32, 8, 8, 16, 0, 2, "none", 64, 0, True).resident_bytes()
            688
        """
        floats = 8 if self.dtype == torch.float64 else 4  # float64 packs keep their floats in float64
        return (self.n_weights * self.elem_bytes + self.n_guard + self.n_floats * floats
                + len(META_FIELDS) * 8 + self.k_bundles * 8)


def _choice(value, table: dict, name: str) -> None:
    if not isinstance(value, str) or value not in table:
        raise ValueError(f"{name} must be one of {sorted(table)}, got {value!r}")


def _integer(value, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


# --- the cost model calibration prices options with (the same bytes ``Layout`` counts) ----------
def mix_bytes(fixed: float, exact_cost: float, guarded_cost: float, always_neurons: int,
              corrected_neurons: float) -> float:
    """Bytes read per token when ``corrected_neurons`` take the exact path: ``fixed`` whatever is
    flagged, the always-exact neurons (corrected every token) at ``exact_cost``, the flagged guarded
    ones at ``guarded_cost``.

    Example:
        >>> mix_bytes(100, 10, 4, 2, 5)
        132
    """
    return (fixed + min(corrected_neurons, always_neurons) * exact_cost
            + max(corrected_neurons - always_neurons, 0) * guarded_cost)


def exact_neuron_bytes(kind: str, d_in: int, d_out: int, elem_bytes: int, bundles: str = "dense") -> int:
    """Bytes one neuron on the exact path reads: its bundle (int8 bundles: codes and three float32
    scales; int4: codes and group scales) and its four floats.

    Example:
        >>> exact_neuron_bytes("gated", 576, 576, 2), exact_neuron_bytes("gated", 576, 576, 2, "int8")
        (3472, 1756)
        >>> exact_neuron_bytes("gated", 576, 576, 2, "int4")
        1096
    """
    if bundles == "int4":
        return quantized_bundle_bytes(kind, d_in, d_out, "int4") + 4 * NEURON_FLOATS
    if bundles == "int8":
        return bundle_row(kind, d_in, d_out) + 4 * QSCALES + 4 * NEURON_FLOATS
    return bundle_row(kind, d_in, d_out) * elem_bytes + 4 * NEURON_FLOATS


def folded_matrix_bytes(d_in: int, d_out: int, elem_bytes: int, weights: str = "dense") -> int:
    """Bytes of Wf, read once per token when the FFN has one (int8 weights: codes and a float32
    scale per row; int4: codes and group scales).

    Example:
        >>> folded_matrix_bytes(576, 576, 2), folded_matrix_bytes(576, 576, 2, "int8")
        (663552, 334080)
        >>> folded_matrix_bytes(576, 576, 2, "int4")
        207360
    """
    if weights == "int4":
        return d_out * int4_row_bytes(d_in)
    if weights == "int8":
        return d_out * (d_in + 4)
    return d_out * d_in * elem_bytes


def always_read_bytes(d_out: int, weights: str = "dense") -> int:
    """Bytes read per token whatever the mix: the folded bias bf (float32) and, with int8
    weights, the output columns' per-channel scales.

    Example:
        >>> always_read_bytes(576), always_read_bytes(576, "int8")
        (2304, 4608)
    """
    return 4 * d_out * (2 if weights == "int8" else 1)


def first_row_bytes(d_in: int, elem_bytes: int, weights: str = "dense") -> int:
    """Bytes of a bundle's first row as the "exact" guard reads it: in the model's dtype, or a
    quantized pack's codes and scale(s).

    Example:
        >>> first_row_bytes(576, 2), first_row_bytes(576, 2, "int8"), first_row_bytes(576, 2, "int4")
        (1152, 580, 360)
    """
    if weights == "int4":
        return int4_row_bytes(d_in)
    if weights == "int8":
        return d_in + 4
    return d_in * elem_bytes


def guard_neuron_bytes(encoding: str, d_in: int, elem_bytes: int, group: int = 64, rank: int = 0,
                       weights: str = "dense") -> int:
    """Bytes the guard reads per guarded neuron: its codes and scales (for "exact", its first row
    in the model's dtype, or quantized in a quantized pack) and its band (two float32).

    Example:
        >>> guard_neuron_bytes("int4", 576, 2, 64), guard_neuron_bytes("exact", 576, 2)
        (332, 1160)
    """
    row = first_row_bytes(d_in, elem_bytes, weights) if encoding == "exact" else guard_row_bytes(encoding, d_in,
                                                                                                  group, rank)
    return row + 8
