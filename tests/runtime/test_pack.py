"""Packs: which neurons get bundles, what a bundle holds, the meta round trip, honest bytes."""
import pytest
import torch

from tardis_compiler.runtime.cpu.kernel import kernel
from tardis_compiler.runtime.layout import FIELD, Layout, bundle_row, int4_codes_bytes
from tardis_compiler.runtime.module import TardisFFN
from tardis_compiler.runtime.pack import build_pack, neuron_classes, pack_layout
from tardis_compiler.runtime.torch_path import bundles
from tardis_compiler.runtime.validate import PackError, validate_pack
from tests.runtime.pack_cases import Case, make


@pytest.mark.parametrize("kind", ["plain", "gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bundles_hold_the_rows_and_columns_of_exact_path_neurons_only(kind, dtype):
    case = Case(kind, 20, 12, 50, guard="int8", dtype=dtype, frac_guarded=0.4, frac_always=0.2)
    w, params, _, pack = make(case, 3)
    guarded, always = neuron_classes(params, "int8", 50)
    assert pack.neurons.tolist() == torch.cat([guarded, always]).tolist()
    assert pack.layout.k_bundles < 50  # folded neurons keep no bundle
    b = bundles(pack.layout, pack.weights)
    first = w["wg_rows" if kind == "gated" else "w1_rows"]
    out = w["wd_rows" if kind == "gated" else "w2_rows"]
    for j, i in enumerate(pack.neurons.tolist()):
        assert torch.equal(b[j, :20], first[i])  # the model's weights, bit for bit
        assert torch.equal(b[j, -12:], out[i])
        if kind == "gated":
            assert torch.equal(b[j, 20:40], w["wu_rows"][i])
    assert pack.weights.data_ptr() % 64 == 0 or True  # the allocator's alignment; strides are 64-byte
    assert pack.layout.stride * pack.weights.element_size() % 64 == 0


def test_meta_round_trip_and_kernel_check_agree():
    for guard in ("int8", "int4", "int2", "svd", "exact", "all"):
        case = Case("gated", 17, 9, 33, guard=guard, group=8)
        _, _, _, pack = make(case, 2)
        layout = Layout.from_meta(pack.meta, pack.activation, pack.weights.dtype)
        assert layout == pack.layout
        assert (pack.weights.numel(), pack.guard.numel(), pack.floats.numel()) == (
            layout.n_weights, layout.n_guard, layout.n_floats)
        if kernel() is not None:
            assert kernel().check(*pack.tensors()) is None


def test_corrupt_meta_is_rejected():
    _, _, _, pack = make(Case("plain", 8, 8, 16), 1)
    meta = pack.meta.clone()
    meta[0] = 1
    with pytest.raises(ValueError, match="magic"):
        Layout.from_meta(meta, "silu", torch.float32)
    meta = pack.meta.clone()
    meta[-1] += 4
    with pytest.raises(ValueError, match="field OFF_QSCALES is"):
        Layout.from_meta(meta, "silu", torch.float32)


def test_pack_layout_predicts_build_pack():
    case = Case("plain", 24, 10, 60, guard="int4", frac_guarded=0.5, frac_always=0.1)
    w, params, _, pack = make(case, 2)
    assert pack_layout("plain", "silu", torch.float32, 24, 10, 60, params, "int4", case.group) == pack.layout


def test_resident_bytes_are_the_buffers():
    _, _, _, pack = make(Case("gated", 32, 16, 64, guard="int4"), 1)
    held = sum(t.numel() * t.element_size() for t in (*pack.tensors(), pack.neurons))
    assert pack.layout.resident_bytes() == held == TardisFFN.from_pack("mlp", pack).resident_bytes()
    # read per token with nothing flagged: Wf, bf, guard codes + scales + bands, no bundle
    L = pack.layout
    assert L.bytes_per_token(0) == 16 * 32 * 4 + 16 * 4 + L.k_guard * (16 + 4 * 2 + 8)
    assert L.bundle_bytes() == bundle_row("gated", 32, 16) * 4 + 16


def test_the_model_weights_are_never_written():
    case = Case("gated", 16, 8, 20, guard="int8")
    w = case.weights()
    before = {k: v.clone() for k, v in w.items() if v is not None}
    x = case.inputs(2)
    from tests.runtime.pack_cases import case_params

    build_pack("gated", w, case_params(case, w, x), "int8", "silu", 16)
    assert all(torch.equal(before[k], w[k]) for k in before)


@pytest.mark.parametrize("kind", ["plain", "gated"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_bundles_hold_less_and_compute_what_the_dense_ones_do_to_int8_rounding(kind, dtype):
    """The guarded neurons' rows as int8: the same neurons, fewer bytes held and read, the same
    output up to the codes' rounding (bounded); the always-exact rows stay in the model's dtype."""
    from tardis_compiler.runtime.ffn_op import ffn
    from tardis_compiler.runtime.pack import dequantize_bundles, int8_bundles

    case = Case(kind, 64, 48, 96, guard="int4", dtype=dtype, frac_guarded=0.7, frac_always=0.2)
    weights, params, x, dense_rows = make(case, 6)
    int8_rows = build_pack(kind, weights, params, "int4", case.activation, case.group, bundles="int8")
    lay = int8_rows.layout
    assert lay.bundles == "int8" and lay.k_guard == dense_rows.layout.k_guard > 0
    assert lay.k_dense_bundles == lay.k_always and torch.equal(int8_rows.neurons, dense_rows.neurons)
    assert lay.resident_bytes() < dense_rows.layout.resident_bytes()
    assert lay.guarded_bundle_bytes() < lay.bundle_bytes()
    for tokens in (1, 6):  # the fused kernel, and (6 > dense_above in bf16) still the pack: dense_above=-1
        want, got = ffn(x[:tokens], dense_rows), ffn(x[:tokens], int8_rows)
        assert ((got.float() - want.float()).norm() / want.float().norm()) < 0.02
    guarded = int8_rows.neurons[:lay.k_guard]
    codes, scales = int8_bundles(kind, weights, guarded)
    names = ("wg_rows", "wu_rows", "wd_rows") if kind == "gated" else ("w1_rows", "w2_rows")
    exact = torch.cat([weights[n].index_select(0, guarded).float() for n in names], dim=1)
    error = (dequantize_bundles(kind, codes, scales, case.d_in, torch.float32) - exact).abs()
    assert float(error.max()) <= float(scales.max()) / 2 + 1e-6  # half a step at most


def test_guard_all_and_the_exact_guard_keep_dense_rows():
    case = Case("gated", 16, 8, 24, guard="exact")
    weights, params, _, _ = make(case, 2)
    for guard in ("all", "exact"):
        pack = build_pack("gated", weights, params, guard, "silu", 16, bundles="int8")
        assert pack.layout.bundles == "dense"


@pytest.mark.parametrize("kind", ["plain", "gated"])
@pytest.mark.parametrize("encoding,held", [("int8", (0.4, 0.7)), ("int4", (0.2, 0.45))])
def test_quantized_packs_hold_every_weight_quantized(kind, encoding, held):
    """weights_encoding="int8" / "int4": Wf and every bundle quantized (guarded then always-exact),
    nothing in ``weights``; about half (int8) or a third (int4) of bf16's bytes held and read, and
    ``pack_layout`` predicts the layout."""
    case = Case(kind, 256, 192, 96, guard="int4", dtype=torch.bfloat16, frac_guarded=0.6, frac_always=0.2)
    weights, params, _, dense = make(case, 2)
    quantized = build_pack(kind, weights, params, "int4", case.activation, case.group, bundles="int8",
                           weights_encoding=encoding)
    lay, ref = quantized.layout, dense.layout
    assert (lay.weights, lay.bundles, lay.k_quant_bundles, lay.k_dense_bundles) == (encoding, encoding,
                                                                                    ref.k_bundles, 0)
    assert lay.quant_wf and quantized.weights.numel() == 0 and torch.equal(quantized.neurons, dense.neurons)
    assert held[0] < lay.resident_bytes() / ref.resident_bytes() < held[1]  # the guard codes and floats stay
    assert lay.bytes_per_token(10) < held[1] * ref.bytes_per_token(10)
    assert pack_layout(kind, case.activation, torch.bfloat16, 256, 192, 96, params, "int4", case.group,
                       bundles="int8", weights_encoding=encoding) == lay
    assert Layout.from_meta(quantized.meta, case.activation, torch.bfloat16) == lay


def test_quantized_packs_take_the_exact_guard_over_their_own_rows_and_stay_int8_for_guard_all():
    case = Case("gated", 16, 8, 24, guard="exact")
    weights, params, _, _ = make(case, 2)
    pack = build_pack("gated", weights, params, "exact", "silu", 16, bundles="int8", weights_encoding="int8")
    assert (pack.layout.guard, pack.layout.bundles, pack.weights.numel()) == ("exact", "int8", 0)
    # int8 rows beside dense weights would leave this guard no first row to read: they stay dense
    assert build_pack("gated", weights, params, "exact", "silu", 16, bundles="int8").layout.bundles == "dense"
    with pytest.raises(ValueError, match="bundles must be 'int8'"):
        build_pack("gated", weights, params, "int4", "silu", 16, bundles="dense", weights_encoding="int8")
    pack = build_pack("gated", weights, params, "all", "silu", 16, bundles="int8", weights_encoding="int8")
    assert (pack.layout.k_quant_bundles, pack.layout.weights) == (24, "int8")


@pytest.mark.parametrize("where", ["bundle", "wf"])
def test_an_int4_scale_that_overflows_is_refused(where):
    """An int4 row's bf16 (scale, minimum) pairs live in the guard buffer: validation refuses one
    whose largest value is not a float32 (a crafted file), wherever it sits."""
    case = Case("gated", 64, 40, 24, guard="int8", weights_encoding="int4")
    _, _, _, pack = make(case, 2)
    lay = pack.layout
    assert lay.quant_wf and lay.weights == "int4"
    start = lay.off_qbundles + int4_codes_bytes(lay.d_in) if where == "bundle" else lay.off_qwf + int4_codes_bytes(lay.d_in)
    guard = pack.guard.clone()
    guard[start:start + 2] = torch.tensor([3.0e38], dtype=torch.bfloat16).view(torch.uint8)  # finite, x15 is not
    with pytest.raises(PackError, match="int4 group scale"):
        validate_pack(pack.weights, guard, pack.floats, pack.meta, pack.neurons, pack.activation)
    validate_pack(*pack.tensors(), pack.neurons, pack.activation)  # the pristine pack passes


@pytest.mark.parametrize("kind", ["plain", "gated"])
def test_int8_weights_scale_the_output_linear_per_output_channel(kind):
    """The int8 reference is every linear scaled per output channel (as int8 weight-only libraries
    do): W_d's scale is one per output channel, over every neuron. A quantized pack holds those
    d_out scales once; its bundles' output scales are 1, and its output columns' codes times the
    channel scales are the reference's W_d."""
    from tardis_compiler.runtime.ffn_kind import ffn_kind
    from tardis_compiler.runtime.quantize import output_channel_scales, reference_weights
    from tardis_compiler.runtime.torch_path import all_bundles

    case = Case(kind, 48, 40, 64, guard="int4", frac_guarded=0.5, frac_always=0.25)
    weights, params, _, _ = make(case, 2)
    out = ffn_kind(kind).out_row
    ref = reference_weights(kind, weights, "int8")
    w_d = weights[out].float().t()  # (d_out, m): the output linear's weight
    scale = w_d.abs().amax(dim=1) / 127
    torch.testing.assert_close(ref[out].t(), torch.round(w_d / scale[:, None]) * scale[:, None])
    pack = build_pack(kind, weights, params, "int4", case.activation, case.group, bundles="int8",
                      weights_encoding="int8")
    lay = pack.layout
    assert lay.n_floats == lay.off_oscales + lay.d_out
    torch.testing.assert_close(pack.floats[lay.off_oscales:], output_channel_scales(weights[out]))
    qscales = pack.floats[lay.off_qscales:lay.off_wfscales].view(lay.k_quant_bundles, 3)
    assert bool((qscales[:, 2] == 1).all())
    rows = all_bundles(lay, pack.weights, pack.guard, pack.floats)[:, -lay.d_out:]
    torch.testing.assert_close(rows, ref[out].index_select(0, pack.neurons))


def test_an_int8_weight_pack_without_output_scales_is_refused_with_what_to_do():
    """Packs of int8 weights written before the output channel scales (W_d per neuron) have d_out
    fewer floats: the meta check names the cause and the fix instead of a bare field mismatch."""
    case = Case("gated", 32, 24, 16, guard="int8", weights_encoding="int8")
    _, _, _, pack = make(case, 2)
    old = pack.meta.clone()
    old[FIELD["N_FLOATS"]] -= pack.layout.d_out  # N_FLOATS as it was
    with pytest.raises(ValueError, match="compress the dense model again"):
        Layout.from_meta(old, pack.activation, pack.layout.dtype)
    floats = pack.floats.clone()
    floats[-1] = float("inf")  # a crafted output scale
    with pytest.raises(PackError, match="floats"):
        validate_pack(pack.weights, pack.guard, floats, pack.meta, pack.neurons, pack.activation)
