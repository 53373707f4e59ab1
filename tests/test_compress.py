"""compress_: the module swap, on tiny random configs of every architecture the tests cover."""
import copy

import pytest
import torch

import tardis_compiler as tc
from tardis_compiler.runtime.module import TardisFFN
from tests.tiny_models import ARCHITECTURES, GATED_ARCHITECTURES, build_tiny, build_tiny_moe, logits, token_batches

QUIET = dict(progress=False, group_size=32)
#: How each architecture's FFN is swapped: its own module where one computes exactly the FFN,
#: else split across the first linear, the activation module and the second linear.
SPLIT = {"bert", "opt", "bloom"}


def _calibrated(arch: str, **config):
    model = build_tiny(arch)
    batches = token_batches(4)
    return model, batches, tc.calibrate(model, batches, tc.CalibrationConfig(**QUIET, **config))


@pytest.mark.parametrize("arch", ARCHITECTURES + GATED_ARCHITECTURES)
def test_guard_all_compressed_model_is_the_dense_model(arch):
    model, batches, profile = _calibrated(arch)
    compressed = copy.deepcopy(model)
    report = tc.compress_(compressed, profile, batches[0], guard="all")
    assert [f.mode for f in report.ffns] == ["split" if arch in SPLIT else "module"] * 2
    assert sum(isinstance(m, TardisFFN) for m in compressed.modules()) == 2
    with torch.no_grad():
        for x in batches[:2]:
            torch.testing.assert_close(logits(compressed(x)), logits(model(x)), atol=1e-5, rtol=1e-5)


#: A quantized FFN's bytes as a fraction of the fp32 one's (int4: half a byte and a 4-byte pair per 32).
QUANTIZED_FRACTION = {"int8": 0.25, "int4": 0.16}


@pytest.mark.parametrize("arch", ARCHITECTURES + GATED_ARCHITECTURES)
@pytest.mark.parametrize("encoding", ["int8", "int4"])
def test_guard_all_quantized_model_is_the_quantized_reference(arch, encoding):
    """weights="int8" / "int4": the exactness invariant against the dense model of the same
    quantized FFN weights (``quantized_reference``), within float32 rounding; a budget then reads
    about half the quantized FFN's bytes."""
    model, batches, profile = _calibrated(arch, weights=encoding)
    reference = tc.quantized_reference(model, batches[0], weights=encoding)
    exact, fitted = copy.deepcopy(model), copy.deepcopy(model)
    tc.compress_(exact, profile, batches[0], guard="all")
    report = tc.compress_(fitted, profile, batches[0])
    assert all(f.mode != "dense" for f in report.ffns)
    assert all(m.layout.weights == encoding for m in fitted.modules() if isinstance(m, TardisFFN))
    with torch.no_grad():
        for x in batches[:2]:
            want = logits(reference(x))
            torch.testing.assert_close(logits(exact(x)), want, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(want, logits(model(x)), atol=1e-5)  # the reference is quantized
    assert report.read_fraction() < 0.5 * QUANTIZED_FRACTION[encoding] + 0.03  # of the fp32 FFN


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exact_guard_over_quantized_rows_is_calibrated_and_priced(arch):
    """guard="exact" with int4 weights: calibration prices each guarded neuron's int4 first row (about
    an int4 guard's bytes), and the packs read those rows, within the budget."""
    model, batches = build_tiny(arch), token_batches(4)
    config = tc.CalibrationConfig(**QUIET, weights="int4")
    profile = tc.calibrate_for_budget(model, batches, 0.5, "exact", config)
    compressed = copy.deepcopy(model)
    report = tc.compress_(compressed, profile, batches[0], guard="exact")
    layouts = [m.layout for m in compressed.modules() if isinstance(m, TardisFFN)]
    assert [(lay.guard, lay.weights) for lay in layouts if lay.k_guard] and all(
        lay.weights == "int4" and lay.guard in ("exact", "none") for lay in layouts)
    assert report.read_fraction() < 0.5 * QUANTIZED_FRACTION["int4"] + 0.03
    with torch.no_grad():
        assert torch.isfinite(logits(compressed(batches[1]))).all()


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_resident_bytes_drop_below_dense(arch):
    """int8 bundles (the default) hold less than dense with no cap; dense bundles hold more, and
    a resident cap brings them below it."""
    model, batches, default = _calibrated(arch)
    _, _, dense_rows = _calibrated(arch, bundles="dense")
    _, _, capped = _calibrated(arch, bundles="dense", resident=0.75)
    held = {}
    for name, profile in (("default", default), ("dense rows", dense_rows), ("capped", capped)):
        compressed = copy.deepcopy(model)
        report = tc.compress_(compressed, profile, batches[0])
        held[name] = report.resident_fraction()
        assert report.read_fraction() <= 0.5 + 0.03
        with torch.no_grad():
            x = batches[1]
            dense, got = logits(model(x)), logits(compressed(x))
        assert ((got - dense).norm() / dense.norm()) < 0.6  # an approximation, bounded
    # Tiny shapes: per-FFN constants (bias floats, padding, meta) are a few % of the bytes here.
    assert held["default"] < 0.80 and held["capped"] < 0.80 < 1.0 < held["dense rows"], held


@pytest.mark.parametrize("bundles", ["int8", "dense"])
def test_a_resident_cap_holds_after_compress(bundles):
    """The cap is on what the compressed model holds: calibration prices every byte a pack keeps
    (padded bundles, floats, the ``neurons`` index, ``meta``), at d=32, m=128 where they matter."""
    model, batches = build_tiny("llama"), token_batches(4)
    for cap in (0.3, 0.5):
        profile = tc.calibrate(model, batches, tc.CalibrationConfig(**QUIET, resident=cap, bundles=bundles))
        compressed = copy.deepcopy(model)
        report = tc.compress_(compressed, profile, batches[0])
        assert len(report.compressed) == 2 and report.resident_fraction() <= cap, (cap, report.resident_fraction())
        modules = [m for m in compressed.modules() if isinstance(m, TardisFFN)]
        assert len(modules) == 2
        for module in modules:
            held = sum(b.numel() * b.element_size() for b in module.buffers())
            assert module.layout.resident_bytes() == held == module.resident_bytes()


def test_routed_moe_experts_are_reported_as_not_considered():
    """Qwen2-MoE: the shared experts are dense FFNs and compress; the routed experts (fused 3-D
    parameters) are not FFNs the matcher sees: the report names them, and its summary counts them."""
    model, batches = build_tiny_moe(), token_batches(4)
    profile = tc.calibrate(model, batches, tc.CalibrationConfig(**QUIET))
    report = tc.compress_(model, profile, batches[0])
    assert [f.name for f in report.compressed] == [f"model.layers.{i}.mlp.shared_expert" for i in range(2)]
    reason = "routed MoE experts: tardis compresses dense FFNs only; they stay dense"
    assert report.not_considered == [(f"model.layers.{i}.mlp.experts", reason) for i in range(2)]
    text = str(report)
    assert f"not considered: model.layers.0.mlp.experts ({reason})" in text
    summary = text.splitlines()[-1]
    assert summary.startswith("compressed 2/2 FFNs found") and "2 modules not considered (routed MoE experts" in summary
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen2MoeExperts"  # left as it was


def test_compressed_modules_drop_the_rows_of_neurons_never_computed_exactly():
    model, batches, profile = _calibrated("llama", resident=0.75, bundles="dense")
    tc.compress_(model, profile, batches[0])
    for module in model.modules():
        if isinstance(module, TardisFFN):
            assert module.layout.k_bundles < module.layout.m
            assert module.neurons.numel() == module.layout.k_bundles


def test_compressed_model_runs_under_inductor_and_generates():
    model, batches, profile = _calibrated("llama")
    tc.compress_(model, profile, batches[0])
    x = batches[1]
    with torch.no_grad():
        eager = logits(model(x))
        torch.compiler.reset()
        compiled = torch.compile(model)  # inductor: the op stays opaque (an extern call)
        torch.testing.assert_close(logits(compiled(x)), eager, atol=1e-4, rtol=1e-4)
    torch.compiler.reset()
    out = model.generate(x[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert out.shape == (1, 9)


def test_pack_dtypes_survive_model_to():
    model, batches, profile = _calibrated("llama")
    tc.compress_(model, profile, batches[0])
    model.to(torch.bfloat16)
    ffn = next(m for m in model.modules() if isinstance(m, TardisFFN))
    assert ffn.weights.dtype == torch.float32 and ffn.floats.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype it was compressed in"):
        ffn(torch.randn(1, ffn.layout.d_in, dtype=torch.bfloat16))


def test_skip_and_profile_mismatches_leave_ffns_dense_with_a_reason():
    model, batches, profile = _calibrated("gpt2")
    report = tc.compress_(model, profile, batches[0], skip=[r"transformer\.h\.0\..*"])
    assert [f.mode for f in report.ffns] == ["dense", "module"]
    assert "skip" in report.ffns[0].reason
    other = build_tiny("llama")
    report = tc.compress_(other, profile, token_batches(1)[0])
    assert all(f.mode == "dense" and "not in the profile" in f.reason for f in report.ffns)
    assert "compressed 0/2" in str(report)


def test_bad_calls_say_what_to_do():
    model, batches, profile = _calibrated("gpt2")
    with pytest.raises(ValueError, match="eval mode"):
        tc.compress_(copy.deepcopy(model).train(), profile, batches[0])
    with pytest.raises(ValueError, match="guard must be one of"):
        tc.compress_(model, profile, batches[0], guard="int3")
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
    with pytest.raises(ValueError, match="pass example_inputs"):
        tc.compress_(mlp, profile)
    with pytest.raises(ValueError, match="found no FFN"):
        tc.compress_(torch.nn.Linear(8, 8).eval(), profile, torch.randn(2, 8))


def test_the_weights_compress_reads_are_not_modified():
    model, batches, profile = _calibrated("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = dict(model.named_parameters())
    tc.compress_(model, profile, batches[0])
    for name, tensor in originals.items():
        torch.testing.assert_close(tensor, before[name], atol=0, rtol=0)


# --- other_linears: the nn.Linear modules no compressed FFN covers, quantized weight-only ------------
def _model_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in (*model.parameters(), *model.buffers())}.values())


# Random tiny weights amplify errors (int8: 0.4% on the weights, 2% on the logits); SmolLM2: test_real_models.
@pytest.mark.parametrize("other,bound", [("int8", 0.05), ("int4", 0.5)])
def test_other_linears_quantize_attention_and_the_head(other, bound):
    from tardis_compiler.runtime.quantized_linear import QuantizedLinear

    model, batches, profile = _calibrated("llama")
    ffns_only, quantized = copy.deepcopy(model), copy.deepcopy(model)
    tc.compress_(ffns_only, profile, batches[0], guard="all")
    report = tc.compress_(quantized, profile, batches[0], guard="all", other_linears=other)
    names = {name for name, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}
    assert names == {q.name for q in report.quantized} and len(names) == 2 * 4 + 1 and "lm_head" in names
    assert not any(type(m) is torch.nn.Linear for m in quantized.modules())
    assert all(q.dtype == other and q.resident_bytes < q.dense_bytes / (1.9 if other == "int8" else 3)
               for q in report.quantized)
    totals = report.totals()
    assert totals["held_after"] < totals["held_before"] and totals["read_after"] < totals["read_before"]
    assert _model_bytes(quantized) < _model_bytes(ffns_only)  # resident bytes drop
    assert f"other linears: 9/9 quantized to {other}" in str(report) and "compress_ in all" in str(report)
    with torch.no_grad():  # guard="all": the FFNs are exact, the linears' quantization is all that differs
        for x in batches[:2]:
            dense, got = logits(model(x)), logits(quantized(x))
            assert ((got - dense).norm() / dense.norm()) < bound, float((got - dense).norm() / dense.norm())


def test_other_linears_quantize_the_linears_of_ffns_left_dense_but_not_skipped_ones():
    from tardis_compiler.runtime.quantized_linear import QuantizedLinear

    model, batches, profile = _calibrated("llama", skip=[r"model\.layers\.0\.mlp"])  # calibration leaves it dense
    report = tc.compress_(model, profile, batches[0], other_linears="int8", skip=["lm_head", r".*\.v_proj"])
    assert [f.mode for f in report.ffns] == ["dense", "module"]
    assert isinstance(model.model.layers[0].mlp.gate_proj, QuantizedLinear)
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.layers[1].self_attn.v_proj) is torch.nn.Linear
    dense = {q.name: q.reason for q in report.linears if q.dtype == "dense"}
    assert dense == {"lm_head": "skipped (skip=)", "model.layers.0.self_attn.v_proj": "skipped (skip=)",
                     "model.layers.1.self_attn.v_proj": "skipped (skip=)"}
    assert "left dense: 3 (skipped (skip=))" in str(report)


def test_a_tied_head_is_quantized_and_untied_or_kept_tied_with_skip():
    from tardis_compiler.runtime.quantized_linear import QuantizedLinear

    model = build_tiny("llama", tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    batches = token_batches(4)
    profile = tc.calibrate(model, batches, tc.CalibrationConfig(**QUIET))
    kept = copy.deepcopy(model)
    embedding = model.model.embed_tokens.weight.detach().clone()
    report = tc.compress_(model, profile, batches[0], other_linears="int8")
    head = next(q for q in report.quantized if q.name == "lm_head")
    assert isinstance(model.lm_head, QuantizedLinear) and head.tied_to == "model.embed_tokens.weight"
    assert head.held_before == 0 and "which keeps the dense weight: held +" in str(report)
    assert model.config.tie_word_embeddings is False and "lm_head.weight" not in model.all_tied_weights_keys
    assert torch.equal(model.model.embed_tokens.weight, embedding)  # the embedding keeps its dense weight
    report = tc.compress_(kept, profile, batches[0], other_linears="int8", skip=["lm_head"])
    assert kept.lm_head.weight is kept.model.embed_tokens.weight and kept.config.tie_word_embeddings


def test_int4_leaves_linears_whose_inputs_do_not_fill_a_group_dense():
    from tardis_compiler.runtime.quantized_linear import QuantizedLinear

    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16),
                                torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)).eval()
    profile = tc.calibrate(model, [torch.randn(256, 16)], tc.CalibrationConfig(progress=False))
    report = tc.compress_(model, profile, torch.randn(2, 16), other_linears="int4")
    assert [(q.name, q.dtype) for q in report.linears] == [("3", "dense"), ("4", "int4")]
    assert "multiple of 32" in report.linears[0].reason and isinstance(model[4], QuantizedLinear)
    with pytest.raises(ValueError, match="other_linears must be one of"):
        tc.compress_(model, profile, torch.randn(2, 16), other_linears="int2")


def test_other_linears_read_the_dense_weights_without_changing_them():
    model, batches, profile = _calibrated("llama")
    originals = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    tc.compress_(model, profile, batches[0], other_linears="int4")
    for name, (tensor, before) in originals.items():
        torch.testing.assert_close(tensor, before, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_keep_dense_runs_batches_through_the_ffns_own_weights(arch):
    """keep_dense: calls of more than dense_above tokens are the dense model's, exactly; one-token
    calls still run the pack (the same output as without keep_dense); the module holds more."""
    model, batches, profile = _calibrated(arch)
    lean, kept = copy.deepcopy(model), copy.deepcopy(model)
    tc.compress_(lean, profile, batches[0])
    report = tc.compress_(kept, profile, batches[0], keep_dense=True, dense_above=4)
    assert all(f.mode != "dense" for f in report.ffns)
    modules = [m for m in kept.modules() if isinstance(m, TardisFFN)]
    assert all(m.dense_above == 4 and m.dense_weights() for m in modules)
    held = lambda mdl: sum(m.resident_bytes() for m in mdl.modules() if isinstance(m, TardisFFN))  # noqa: E731
    assert held(kept) > held(lean)
    with torch.no_grad():
        x = batches[1]  # 2 x 16 tokens: above dense_above
        torch.testing.assert_close(logits(kept(x)), logits(model(x)), atol=1e-5, rtol=1e-5)
        one = x[:1, :1]
        torch.testing.assert_close(logits(kept(one)), logits(lean(one)), atol=0, rtol=0)


def test_keep_dense_arguments_are_checked():
    model, batches, profile = _calibrated("llama")
    with pytest.raises(ValueError, match="dense_above must be"):
        tc.compress_(model, profile, batches[0], keep_dense=True, dense_above="often")
    with pytest.raises(ValueError, match="keep_dense must be"):
        tc.compress_(model, profile, batches[0], keep_dense="yes")
