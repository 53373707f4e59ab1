"""Calibration results: per FFN neuron, its range, its line, and the guard's margins.

A profile is a folder: ``profile.json`` (format version, calibration config, every FFN's name,
shapes, activation and measured statistics) and ``tensors.safetensors`` (the per-neuron vectors).
No pickle: loading a profile never runs code.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from .accounting import dense_ffn_bytes, exact_neuron_bytes, ffn_bytes_per_token
from .config import DEFAULT_GUARDS, PREDICTOR_GUARDS, CalibrationConfig

if TYPE_CHECKING:
    from .runtime.layout import Layout

FORMAT = "tardis-profile"
FORMAT_VERSION = 1
_VECTORS = ("slope", "intercept", "lower", "upper", "line_error")


class ProfileMismatchError(ValueError):
    """A profile was applied to a model whose FFNs differ from the calibrated ones."""


class ProfileError(ValueError):
    """A saved profile is missing, unreadable or inconsistent; the message names the file and field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")


# eq=False: identity equality. Dynamo compares torch.compile options (which hold the profile) when
# it picks a cached graph; field-wise equality would compare tensors and raise.
@dataclasses.dataclass(eq=False)
class FFNProfile:
    """Calibration of one FFN. Vectors have one entry per hidden neuron (float32).

    ``margins[guard]`` widens the guard's flag band for that low-bit guard; ``stats`` holds what
    calibration measured (range coverage; per guard: flag rate, recall and output error on the
    held-out calibration tokens).
    """

    name: str
    pattern: str
    activation: str
    d_in: int
    d_hidden: int
    d_out: int
    slope: torch.Tensor
    intercept: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    line_error: torch.Tensor
    margins: dict[str, torch.Tensor]
    stats: dict[str, Any]
    kind: str = "plain"  # "gated": intercept holds the constant gate c, slope is zero
    predictor: torch.Tensor | None = None  # the "svd" guard's factors [Q^T | P], (r, m + d_in)
    # The least-squares map [W | b], (d_out, d_in + 1), standing in for every neuron folded without
    # a guard (calibrate/lstsq_fold.py); the pack adds it to Wf except with guard="all".
    fold_term: torch.Tensor | None = None

    def params(self, guard: str) -> torch.Tensor:
        """The (6, m) tensor the fused op takes: slope, intercept, lower, upper, flag thresholds
        (for "svd", (6 + r, m + d_in): the predictor's factors below, see ``pack.split_params``).

        Example: ``profile.ffns[name].params("int4")``.
        """
        if guard in PREDICTOR_GUARDS:
            if guard not in self.margins:
                raise ValueError(f"FFN {self.name!r} was calibrated for guard(s) {sorted(self.margins) or ['exact']}"
                                 f", not {guard!r} (a per-neuron mix depends on its guard's cost): "
                                 "calibrate again with this guard"
                                 + (" and a budget" if guard == "svd" else ""))
            margin = self.margins[guard]
            lo, hi = self.lower + margin, self.upper - margin
        else:
            lo, hi = self.lower, self.upper
        rows = torch.stack([self.slope, self.intercept, self.lower, self.upper, lo, hi]).float()
        if guard == "svd":  # the predictor's factors ride below the per-neuron rows (pack.split_params)
            rows = torch.cat([torch.cat([rows, rows.new_zeros(6, self.d_in)], dim=1), self.predictor.float()])
        return rows.contiguous()

    def bytes_per_token(self, guard: str, elem_bytes: int | None = None, has_bias: bool | None = None,
                        bundles: str | None = None) -> float:
        """FFN weight bytes read per token (batch 1) when folded with ``guard``, at the flag rate
        calibration measured; ``guard="dense"`` for the dense FFN. The weights' element size and
        bias default to the calibrated model's; ``bundles`` (how the guarded neurons' rows are
        stored, "int8" or "dense") to what calibration priced (``self.bundles``).

        Example: ``ffn.bytes_per_token("int8") / ffn.bytes_per_token("dense")``.
        """
        total = self._bytes_per_token(guard, elem_bytes, has_bias)
        if bundles is not None and bundles != self.bundles and guard not in ("all", "dense", "exact"):
            saving = self._int8_bundle_saving(guard, elem_bytes)
            total += -saving if bundles == "int8" else saving
        return total

    @property
    def bundles(self) -> str:
        """How calibration priced the guarded neurons' rows, so how packs hold them: "int8" or
        "dense" (fits that price nothing, and profiles from before int8 rows)."""
        return self.stats.get("bundles", "dense")

    @property
    def weights(self) -> str:
        """How calibration priced Wf and the always-exact bundles, so how packs hold them: "int8" or
        "int4" (a quantized pack, ``CalibrationConfig.weights``) or "dense"."""
        return self.stats.get("weights", "dense")

    def _int8_bundle_saving(self, guard: str, elem_bytes: int | None) -> float:
        """Bytes per token int8 bundles save over dense ones: each flagged guarded neuron reads
        codes, not rows."""
        from .runtime.pack import neuron_classes

        guarded, _ = neuron_classes(self.params(guard), guard, self.d_hidden)
        rate = self.stats.get("guards", {}).get(guard, {}).get("flag_rate", 1.0)
        elem = self.stats.get("elem_bytes", 4) if elem_bytes is None else elem_bytes
        per_neuron = (exact_neuron_bytes(self.kind, self.d_in, self.d_out, elem)
                      - exact_neuron_bytes(self.kind, self.d_in, self.d_out, elem, "int8"))
        return rate * guarded.numel() * per_neuron

    def _bytes_per_token(self, guard: str, elem_bytes: int | None, has_bias: bool | None) -> float:
        if guard == "all":  # every neuron exact, nothing folded: the dense FFN's rows, read as bundles
            elem = self.stats.get("elem_bytes", 4) if elem_bytes is None else elem_bytes
            bias = self.stats.get("has_bias", True) if has_bias is None else has_bias
            return float(dense_ffn_bytes(self.kind, self.d_in, self.d_hidden, self.d_out, elem, bias, bias,
                                         self.weights))
        if self.has_policy:
            return self._policy_bytes_per_token(guard, elem_bytes)
        elem_bytes = self.stats.get("elem_bytes", 4) if elem_bytes is None else elem_bytes
        has_bias = self.stats.get("has_bias", True) if has_bias is None else has_bias
        measured = self.stats.get("guards", {}).get(guard, {})
        rate = 1.0 if guard == "all" else measured.get("flag_rate", 1.0)
        return ffn_bytes_per_token(self.d_in, self.d_hidden, self.d_out, elem_bytes, has_bias, guard, rate,
                                   measured.get("bytes", 0))

    @property
    def has_policy(self) -> bool:
        """Whether a per-neuron mix was fitted (every gated FFN; plain ones fitted to a budget)."""
        return "policy" in self.stats

    def _policy_bytes_per_token(self, guard: str, elem_bytes: int | None) -> float:
        # Measured by calibration for its guard (calibrate/gated.py, plain.py); scaled to another weight
        # dtype, except a quantized pack's: its codes are the same whatever the model's dtype.
        scale = 1.0 if elem_bytes is None or self.weights != "dense" else elem_bytes / self.stats["elem_bytes"]
        if guard == "dense":
            return self.stats["dense_bytes"] * scale
        measured = self.stats["guards"].get(guard)
        if measured is None:
            raise ValueError(f"FFN {self.name!r} was calibrated for guard {sorted(self.stats['guards'])}, "
                             f"not {guard!r}: calibrate again with this guard")
        return measured["bytes_per_token"] * scale

    def layout(self, guard: str, dtype: torch.dtype, group_size: int, bundles: str | None = None) -> "Layout":
        """The layout of the pack this calibration gives with ``guard`` in ``dtype``: its resident
        bytes and what each neuron costs (``runtime/layout.py``), without building it. ``bundles``
        defaults to what calibration priced (``self.bundles``), as the packs are built.

        Example: ``ffn.layout("int4", torch.bfloat16, 64).resident_bytes()``.
        """
        from .runtime.pack import pack_layout

        return pack_layout(self.kind, self.activation, dtype, self.d_in, self.d_out, self.d_hidden,
                           self.params(guard), guard, group_size, self.fold_term,
                           bundles or self.bundles, self.weights)

    def signature(self) -> tuple[int, int, int, str, str]:
        """What must match between a model's FFN and this profile."""
        return (self.d_in, self.d_hidden, self.d_out, self.activation, self.kind)


@dataclasses.dataclass(eq=False)
class Profile:
    """Everything ``calibrate`` learned; pass it as ``options={"profile": profile}``.

    Example:
        >>> import tempfile, tardis_compiler as tc
        >>> p = tc.Profile(ffns={}, config=tc.CalibrationConfig(), tokens=0, source="demo")
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p.save(d); tc.Profile.load(d).source
        'demo'
    """

    ffns: dict[str, FFNProfile]
    config: CalibrationConfig
    tokens: int
    source: str
    version: int = FORMAT_VERSION

    def save(self, path: str | os.PathLike) -> None:
        """Write ``path/profile.json`` and ``path/tensors.safetensors`` (creating ``path``)."""
        os.makedirs(path, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        ffns = {}
        for name, ffn in self.ffns.items():
            for field in _VECTORS:
                tensors[f"{name}/{field}"] = getattr(ffn, field).float().contiguous()
            for guard, margin in ffn.margins.items():
                tensors[f"{name}/margin.{guard}"] = margin.float().contiguous()
            if ffn.predictor is not None:
                tensors[f"{name}/predictor"] = ffn.predictor.float().contiguous()
            if ffn.fold_term is not None:
                tensors[f"{name}/fold_term"] = ffn.fold_term.float().contiguous()
            ffns[name] = {
                "pattern": ffn.pattern, "activation": ffn.activation, "d_in": ffn.d_in,
                "d_hidden": ffn.d_hidden, "d_out": ffn.d_out, "guards": sorted(ffn.margins),
                "stats": ffn.stats, "kind": ffn.kind,
            }
        meta = {
            "format": FORMAT, "version": self.version, "tokens": self.tokens, "source": self.source,
            "config": self.config.to_dict(), "ffns": ffns,
        }
        with open(os.path.join(path, "profile.json"), "w") as f:
            json.dump(meta, f, indent=1)
        save_file(tensors, os.path.join(path, "tensors.safetensors"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Profile":
        """Read a profile written by ``save``. Every field is checked against the FFN shapes it
        claims; anything wrong raises ``ProfileError`` naming the file and the field.

        Example:
            >>> Profile.load("/no/such/profile")   # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            tardis_compiler.profile.ProfileError: /no/such/profile/profile.json: not found: ...
        """
        meta_path = os.path.join(path, "profile.json")
        tensor_path = os.path.join(path, "tensors.safetensors")
        if not os.path.isfile(meta_path):
            raise ProfileError(meta_path, "not found: is this a folder written by Profile.save?")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(meta_path, f"not readable JSON ({exc})") from exc
        check = _Checker(meta_path)
        check.that(isinstance(meta, dict), "the file", "must be a JSON object")
        check.that(meta.get("format") == FORMAT, "format", f"is {meta.get('format')!r}, not a tardis profile")
        version = meta.get("version")
        check.that(isinstance(version, int) and not isinstance(version, bool) and version >= 1, "version",
                   f"must be a positive integer, got {version!r}")
        check.that(version <= FORMAT_VERSION, "version", f"{version} is newer than this tardis_compiler reads "
                   f"({FORMAT_VERSION}): upgrade the package")
        for key, kind in (("tokens", int), ("source", str), ("config", dict), ("ffns", dict)):
            check.that(isinstance(meta.get(key), kind), key, f"missing or not a {kind.__name__}")
        try:
            # A profile from before int8 bundles was priced for dense ones: keep them.
            config = CalibrationConfig.from_dict({"bundles": "dense", **meta["config"]})
        except (TypeError, ValueError) as exc:
            raise ProfileError(meta_path, f"config: {exc}") from exc
        if not os.path.isfile(tensor_path):
            raise ProfileError(tensor_path, "not found (the profile's tensors)")
        try:
            tensors = load_file(tensor_path)
        except Exception as exc:  # safetensors raises its own error types
            raise ProfileError(tensor_path, f"not a readable safetensors file ({exc})") from exc
        ffns = {name: _load_ffn(name, info, tensors, _Checker(meta_path), tensor_path)
                for name, info in meta["ffns"].items()}
        return cls(ffns=ffns, config=config, tokens=meta["tokens"], source=meta["source"], version=version)

    def bytes_fraction(self, guard: str | None = None) -> float:
        """FFN weight bytes read per token with ``guard`` (None: each FFN kind's default guard),
        as a fraction of dense (all FFNs).

        Example: ``tc.calibrate(model, batches).bytes_fraction("int4")``.
        """
        dense = sum(f.bytes_per_token("dense") for f in self.ffns.values())
        return sum(f.bytes_per_token(guard or DEFAULT_GUARDS[f.kind]) for f in self.ffns.values()) / dense

    def check(self, found: dict[str, tuple[int, int, int, str, str]]) -> None:
        """Raise ``ProfileMismatchError`` unless every FFN in ``found`` (name -> d_in, d_hidden,
        d_out, activation, kind) was calibrated with the same shapes, activation and kind."""
        problems = []
        for name, signature in found.items():
            ffn = self.ffns.get(name)
            if ffn is None:
                problems.append(f"  {name}: not in the profile")
            elif ffn.signature() != signature:
                problems.append(f"  {name}: model has (d_in, d_hidden, d_out, act, kind)={signature}, "
                                f"profile has {ffn.signature()}")
        if problems:
            known = ", ".join(list(self.ffns)[:4]) + (" ..." if len(self.ffns) > 4 else "")
            raise ProfileMismatchError(
                "this profile does not match the model's FFNs:\n" + "\n".join(problems[:8])
                + f"\nThe profile covers: {known or 'no FFNs'}. Calibrate this model with "
                "tardis_compiler.calibrate(model, batches) and pass that profile.")


class _Checker:
    def __init__(self, path: str) -> None:
        self.path = path

    def that(self, ok: bool, field: str, message: str) -> None:
        if not ok:
            raise ProfileError(self.path, f"{field}: {message}")


def _load_ffn(name: str, info: Any, tensors: dict[str, torch.Tensor], check: _Checker,
              tensor_path: str) -> FFNProfile:
    """One FFN of a saved profile, every field checked against its shapes."""
    where = f"ffns[{name!r}]"
    check.that(isinstance(info, dict), where, "must be an object")
    for key in ("d_in", "d_hidden", "d_out"):
        value = info.get(key)
        check.that(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"{where}.{key}",
                   f"must be a positive integer, got {value!r}")
    for key in ("pattern", "activation"):
        check.that(isinstance(info.get(key), str), f"{where}.{key}", "missing or not a string")
    kind = info.get("kind", "plain")
    check.that(kind in ("plain", "gated"), f"{where}.kind", f"must be 'plain' or 'gated', got {kind!r}")
    guards = info.get("guards", [])
    check.that(isinstance(guards, list) and all(g in PREDICTOR_GUARDS for g in guards), f"{where}.guards",
               f"must list guards among {PREDICTOR_GUARDS}, got {guards!r}")
    check.that(isinstance(info.get("stats"), dict), f"{where}.stats", "missing or not an object")
    m, d_in = info["d_hidden"], info["d_in"]
    vector_check = _Checker(tensor_path)

    def vector(key: str, allow_inf: bool) -> torch.Tensor:
        t = tensors.get(f"{name}/{key}")
        field = f"{name}/{key}"
        vector_check.that(t is not None, field, "missing")
        vector_check.that(tuple(t.shape) == (m,), field, f"has shape {tuple(t.shape)}, the FFN has d_hidden={m}")
        vector_check.that(not bool(t.isnan().any()), field, "has NaN values")
        vector_check.that(allow_inf or bool(torch.isfinite(t).all()), field, "has infinite values")
        return t

    # lower/upper encode the per-neuron option with +-inf, and an unbounded range has an infinite
    # line error; the lines and margins must be finite.
    values = {key: vector(key, allow_inf=key in ("lower", "upper", "line_error")) for key in _VECTORS}
    margins = {g: vector(f"margin.{g}", allow_inf=False) for g in guards}
    predictor = tensors.get(f"{name}/predictor")
    if predictor is not None:
        vector_check.that(predictor.dim() == 2 and predictor.shape[1] == m + d_in, f"{name}/predictor",
                          f"has shape {tuple(predictor.shape)}, expected (rank, d_hidden + d_in = {m + d_in})")
        vector_check.that(bool(torch.isfinite(predictor).all()), f"{name}/predictor", "has non-finite values")
    fold_term = tensors.get(f"{name}/fold_term")
    if fold_term is not None:
        expected = (info["d_out"], d_in + 1)
        vector_check.that(tuple(fold_term.shape) == expected, f"{name}/fold_term",
                          f"has shape {tuple(fold_term.shape)}, expected (d_out, d_in + 1) = {expected}")
        vector_check.that(bool(torch.isfinite(fold_term).all()), f"{name}/fold_term", "has non-finite values")
    return FFNProfile(name=name, pattern=info["pattern"], activation=info["activation"], d_in=d_in, d_hidden=m,
                      d_out=info["d_out"], **values, margins=margins, stats=info["stats"], kind=kind,
                      predictor=predictor, fold_term=fold_term)
