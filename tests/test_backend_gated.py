"""End-to-end invariants of backend="tardis" on gated FFNs (LLaMA, Mistral, Qwen2, Gemma, Gemma3,
Phi-3 fused, ReGLU), tiny random configs built in memory."""
import pytest
import torch

import tardis_compiler as tc
from tests.tiny_models import GATED_ARCHITECTURES, FusedGatedBlock, ReGLUBlock, build_tiny, logits, token_batches

QUIET = tc.CalibrationConfig(progress=False, group_size=32, budget=0.5)
VARIANTS = [*GATED_ARCHITECTURES, "llama+bias"]
#: The tests below check the pack (exactness, errors, counters) on 32-token inputs, which the default
#: dense_above="auto" would hand to the dense FFN: they run every token through the pack.
PACK = {"dense_above": None}


def _build(variant: str) -> torch.nn.Module:
    if variant == "llama+bias":
        model = build_tiny("llama", mlp_bias=True)
        with torch.no_grad():  # HF zero-initialises biases; make them matter
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0.0, 0.3)
        return model
    return build_tiny(variant)


@pytest.fixture(scope="module")
def gated_profiles():
    return {v: tc.calibrate(_build(v), token_batches(6), QUIET) for v in VARIANTS}


def _compile_and_run(model, ids, **options):
    compiled = torch.compile(model, backend="tardis", options={**PACK, **options})
    with torch.no_grad():
        return logits(compiled(ids))


@pytest.mark.parametrize("variant", VARIANTS)
def test_guard_all_equals_eager_under_inductor(variant, gated_profiles):
    model = _build(variant)
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = logits(model(ids))
    got = _compile_and_run(model, ids, profile=gated_profiles[variant], guard="all")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_budget_is_met_and_every_gated_ffn_is_rewritten(variant, gated_profiles):
    model = _build(variant)
    ids = token_batches(1, seed=9)[0]
    report = tc.explain(model, ids, profile=gated_profiles[variant], inner="eager")
    assert [r.kind for r in report.ffns] == ["gated"] * 2 and all(r.status == "rewritten" for r in report.ffns)
    assert report.code.count("tardis.ffn") == 2
    for op in ("silu(", "gelu(", "chunk("):  # the FFN bodies are gone
        assert op not in report.code
    for row in report.ffns:
        assert row.bytes_tardis / row.bytes_dense <= 0.5 * 1.1
        assert sum(row.policy.values()) == row.d_hidden
    assert "Neuron mix per FFN" in str(report)


@pytest.mark.parametrize("variant", ["llama", "gemma", "phi3"])
def test_budget_error_is_bounded_and_shrinks_with_the_budget(variant):
    model = _build(variant)
    calib, ids = token_batches(6), token_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = logits(model(ids))
    errors = []
    for budget in (0.3, 0.8):
        torch.compiler.reset()
        profile = tc.calibrate(model, calib, tc.CalibrationConfig(progress=False, group_size=32, budget=budget))
        got = _compile_and_run(model, ids, profile=profile, inner="eager")
        errors.append(((got - expected).norm() / expected.norm()).item())
    assert errors[1] < errors[0] < 0.5, errors


def test_budget_option_with_auto_calibration():
    model = build_tiny("llama")
    batches = token_batches(4)
    compiled = torch.compile(model, backend="tardis", options={"budget": 0.4, "calibration_calls": 3, "inner": "eager",
                                                                **PACK})
    with torch.no_grad(), tc.collect_stats() as stats:
        for ids in batches:
            compiled(ids)
    assert set(stats.ffns) == {"model.layers.0.mlp", "model.layers.1.mlp"}  # the 4th call ran folded


@pytest.mark.parametrize("make", [lambda: ReGLUBlock(bias=True), lambda: FusedGatedBlock(bias=True),
                                  lambda: FusedGatedBlock(bias=False, up_first=True)])
def test_reglu_and_fused_gate_up_modules(make):
    torch.manual_seed(0)
    block = make().eval()
    x = torch.randn(64, block_d(block))
    profile = tc.calibrate(block, [torch.randn(64, block_d(block)) for _ in range(4)], QUIET)
    with torch.no_grad():
        expected = block(x)
        got = torch.compile(block, backend="tardis", options={"profile": profile, "guard": "all", **PACK})(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def block_d(block) -> int:
    return next(p for p in block.parameters() if p.dim() == 2).shape[1]


def test_generate_under_dynamic_shapes_is_token_exact(gated_profiles):
    model = build_tiny("llama")
    ids = token_batches(1, seed=4)[0][:1, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        model.forward = torch.compile(model.forward, backend="tardis", dynamic=True,
                                      options={"profile": gated_profiles["llama"], "guard": "all", "inner": "eager"})
        got = model.generate(ids, **kwargs)
    assert torch.equal(got, expected)


def test_weights_never_modified(gated_profiles):
    model = build_tiny("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _compile_and_run(model, token_batches(1)[0], profile=gated_profiles["qwen2"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_plain_profile_does_not_fit_a_gated_model(gated_profiles):
    with pytest.raises(Exception, match="kind"):  # dynamo wraps it in BackendCompilerFailed
        _compile_and_run(build_tiny("llama"), token_batches(1)[0], profile=_plain_profile_like(gated_profiles["llama"]))


def _plain_profile_like(profile):
    import dataclasses

    ffns = {n: dataclasses.replace(f, kind="plain") for n, f in profile.ffns.items()}
    return tc.Profile(ffns=ffns, config=profile.config, tokens=profile.tokens, source="plain")


@pytest.mark.parametrize("variant", ["llama", "phi3"])
def test_bf16_model_calibrates_and_runs_under_inductor(variant):
    """Calibration, the guard, the fold and the kernel all on a bf16 model; with guard="all" it is
    as far from the float32 model as the dense bf16 model is (both are bf16 roundings of it)."""
    model32 = _build(variant)
    model = _build(variant).to(torch.bfloat16)
    profile = tc.calibrate(model, token_batches(6), QUIET)
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        reference, dense_bf16 = logits(model32(ids)), logits(model(ids)).float()
    rel = lambda got: ((got.float() - reference).norm() / reference.norm()).item()  # noqa: E731
    exact = rel(_compile_and_run(model, ids, profile=profile, guard="all"))
    torch.compiler.reset()
    folded = rel(_compile_and_run(model, ids, profile=profile))
    dense = rel(dense_bf16)
    print(f"bf16 {variant}: dense {dense:.4f}, guard=all {exact:.4f}, budget 0.5 {folded:.4f}")
    assert exact < 1.5 * dense
    assert folded < 0.5
