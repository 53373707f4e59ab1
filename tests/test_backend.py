"""End-to-end invariants of backend="tardis" on every plain-FFN architecture (issue: "Invariants")."""
import warnings

import pytest
import torch

import tardis_compiler as tc
from tests.tiny_models import ARCHITECTURES, build_tiny, logits, token_batches

QUIET = tc.CalibrationConfig(progress=False, group_size=32, budget=None)  # the uniform coverage fit, every low-bit guard
DECODERS = [a for a in ARCHITECTURES if a != "bert"]
#: The tests below check the pack (exactness, errors, flags, counters) on 32-token inputs, which the
#: default dense_above="auto" would hand to the dense FFN: they run every token through the pack.
PACK = {"dense_above": None}


@pytest.fixture(scope="module")
def profiles():
    return {arch: tc.calibrate(build_tiny(arch), token_batches(6), QUIET) for arch in ARCHITECTURES}


def _run(model, ids, **options):
    compiled = torch.compile(model, backend="tardis", options={**PACK, **options})
    with torch.no_grad():
        return logits(compiled(ids))


def test_backend_is_registered_by_entry_point():
    assert "tardis" in torch._dynamo.list_backends()


def test_guard_all_equals_eager_under_inductor(tiny_arch, profiles):
    model = build_tiny(tiny_arch)
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = logits(model(ids))
    got = _run(model, ids, profile=profiles[tiny_arch], guard="all")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("guard", ["int4", "exact"])
def test_default_guard_error_is_bounded_and_reported(tiny_arch, profiles, guard):
    model = build_tiny(tiny_arch)
    ids = token_batches(1, seed=9)[0][:1, :6]
    with torch.no_grad():
        expected = logits(model(ids))
    # dense_above=None: every call takes the approximation, whatever "auto" is at this thread count
    report = tc.explain(model, ids, profile=profiles[tiny_arch], guard=guard, inner="eager", dense_above=None)
    for row in report.ffns:
        assert row.status == "rewritten"
        assert row.recall is not None and row.rel_error is not None and row.error_bound > 0
        assert row.runtime_flag_rate is not None and 0 < row.runtime_flag_rate < 1
    torch.compiler.reset()
    got = _run(model, ids, profile=profiles[tiny_arch], guard=guard, inner="eager", dense_above=None)
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel < 0.25, f"relative logit error {rel:.3f}"


def test_single_ffn_error_within_reported_bound():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    calib = [torch.randn(64, 64) for _ in range(8)]
    profile = tc.calibrate(mlp, calib, QUIET)
    bound = profile.ffns[""].stats["error_bound"]
    x = torch.randn(1, 64)
    for guard in ("exact", "int4"):
        torch.compiler.reset()
        compiled = torch.compile(mlp, backend="tardis", options={"profile": profile, "guard": guard, "inner": "eager"})
        with torch.no_grad():
            err = (compiled(x) - mlp(x)).abs().max().item()
        assert 0 < err <= bound, (guard, err, bound)


def test_two_instances_each_get_their_own_outputs(profiles):
    a, b = build_tiny("gpt2", seed=0), build_tiny("gpt2", seed=1)
    ids = token_batches(1, seed=9)[0]
    options = {"guard": "all", "inner": "eager", "calibration_calls": 1, **PACK}  # one backend, one reused graph
    ca = torch.compile(a, backend="tardis", options=options)
    cb = torch.compile(b, backend="tardis", options=options)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(logits(ca(ids)), logits(a(ids)), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits(cb(ids)), logits(b(ids)), atol=1e-5, rtol=1e-5)


def test_in_place_weight_update_is_reflected(profiles):
    model = build_tiny("bloom")
    ids = token_batches(1, seed=9)[0]
    compiled = torch.compile(model, backend="tardis", options={"profile": profiles["bloom"], "guard": "all", **PACK})
    with torch.no_grad():
        compiled(ids)
        model.transformer.h[0].mlp.dense_4h_to_h.weight.mul_(-1.5)
        model.transformer.h[1].mlp.dense_h_to_4h.bias.add_(0.3)
        torch.testing.assert_close(logits(compiled(ids)), logits(model(ids)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_under_dynamic_shapes(arch):
    model = build_tiny(arch)
    prompt = token_batches(1, seed=9)[0][:1, :5]
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    model.compile(backend="tardis", dynamic=True,
                  options={"guard": "all", "calibration_calls": 2, "inner": "eager", "calibration": {"progress": False}})
    with torch.no_grad(), tc.collect_stats() as stats:
        got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, expected)
    assert stats.ffns and all(c.calls >= 3 for c in stats.ffns.values()), "decode steps must run the fused op"


def test_generate_with_inductor():
    model = build_tiny("opt")
    prompt = token_batches(1, seed=9)[0][:1, :5]
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=5, do_sample=False)
    model.compile(backend="tardis", dynamic=True, options={"guard": "all", "calibration_calls": 2,
                                                           "calibration": {"progress": False}})
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), expected)


@pytest.mark.parametrize("guard", ["all", "int4"])
def test_bf16_runs(tiny_arch, guard):
    model = build_tiny(tiny_arch, dtype=torch.bfloat16)
    profile = tc.calibrate(model, token_batches(3), QUIET)
    ids = token_batches(1, seed=9)[0]
    with torch.no_grad():
        expected = logits(model(ids)).float()
        reference = logits(build_tiny(tiny_arch)(ids))  # the same weights in float32
    got = _run(model, ids, profile=profile, guard=guard, inner="eager").float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    if guard == "all":
        # Measured 0.6-0.7% from the dense bf16 model on these archs (both are bf16 roundings of
        # the float32 one, and tardis is no farther from it than dense bf16 is).
        assert rel(got, expected) < 0.012
        assert rel(got, reference) < 1.25 * rel(expected, reference)
    else:
        assert rel(got, expected) < 0.3


def test_auto_calibration_runs_dense_then_folded():
    model = build_tiny("gpt_neox")
    batches = token_batches(4, seed=3)
    compiled = torch.compile(model, backend="tardis", options={"calibration_calls": 3, "guard": "all", "inner": "eager",
                                                                "calibration": {"progress": False}, **PACK})
    with torch.no_grad(), tc.collect_stats() as stats:
        for ids in batches[:3]:
            torch.testing.assert_close(logits(compiled(ids)), logits(model(ids)))
        assert not stats.ffns, "calibration calls run the dense graph"
        torch.testing.assert_close(logits(compiled(batches[3])), logits(model(batches[3])), atol=1e-5, rtol=1e-5)
    assert stats.ffns["gpt_neox.layers.0.mlp"].calls == 1


def test_weights_never_modified(tiny_arch, profiles):
    model = build_tiny(tiny_arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _run(model, token_batches(1)[0], profile=profiles[tiny_arch], inner="eager")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_training_mode_is_refused_with_a_clear_error():
    model = build_tiny("bert").train()
    compiled = torch.compile(model, backend="tardis", options={"inner": "eager"})
    with pytest.raises(Exception, match=r"training mode .* model\.eval\(\)"):
        compiled(token_batches(1)[0])


def test_autograd_on_leaves_ffns_dense_and_says_why():
    model = build_tiny("opt")
    ids = token_batches(1)[0]
    graphs = []
    from tardis_compiler.backend import TardisCompiler
    compiled = torch.compile(model, backend=TardisCompiler(tc.TardisOptions(inner="eager"), reports=graphs))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = logits(compiled(ids))
    torch.testing.assert_close(out, logits(model(ids)))
    assert any("torch.no_grad" in str(w.message) for w in caught)
    assert all(f.status == "dense" for f in graphs[0].ffns) and "inference-only" in graphs[0].notes[0]


def test_skip_option_leaves_named_ffns_dense(profiles):
    report = tc.explain(build_tiny("gpt2"), token_batches(1)[0], profile=profiles["gpt2"], inner="eager",
                        skip=[r"transformer\.h\.0\..*"])
    status = {f.name: f.status for f in report.ffns}
    assert status == {"transformer.h.0.mlp": "dense", "transformer.h.1.mlp": "rewritten"}


def test_same_model_compiled_with_two_profiles(profiles):
    # Dynamo compares the options of cached graphs; a profile must survive that comparison.
    model = build_tiny("opt")
    other = tc.calibrate(model, token_batches(2, seed=5), QUIET)
    ids = token_batches(1, seed=9)[0]
    first = torch.compile(model, backend="tardis", options={"profile": profiles["opt"], "guard": "all", "inner": "eager",
                                                            **PACK})
    second = torch.compile(model, backend="tardis", options={"profile": other, "guard": "all", "inner": "eager", **PACK})
    with torch.no_grad():
        torch.testing.assert_close(logits(first(ids)), logits(second(ids)), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits(first(ids)), logits(model(ids)), atol=1e-5, rtol=1e-5)
