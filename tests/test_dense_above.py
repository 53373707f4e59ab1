"""The backend's ``dense_above`` option: calls of more tokens than it run the FFN's own (dense)
weights instead of the pack; "auto" takes the measured figure per dtype and thread count (``DENSE_ABOVE``), None
never does. Counters count dense calls apart (``dense_calls``, ``dense_tokens``)."""
import pytest
import torch

import tardis_compiler as tc
from tardis_compiler.backend import TardisCompiler
from tardis_compiler.runtime.ffn_op import dense_above_for
from tests.tiny_models import build_tiny, logits, token_batches

QUIET = tc.CalibrationConfig(progress=False, group_size=32)


@pytest.fixture(autouse=True)
def _two_threads():
    """The crossovers these tests name are DENSE_ABOVE's 2-thread figures ("auto" follows the
    threads); tests/conftest.py restores the thread count afterwards."""
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def budget_profiles():
    """Profiles fitted to half the dense bytes: the pack is an approximation (error > 0), so an
    output equal to the dense model's says the dense FFN ran."""
    return {arch: tc.calibrate_for_budget(build_tiny(arch), token_batches(4), 0.5, config=QUIET)
            for arch in ("gpt2", "llama", "phi3")}


def _ids(batch: int, length: int, seed: int = 9) -> torch.Tensor:
    return token_batches(1, length=length, batch=batch, seed=seed)[0]


def _run(compiled, ids):
    """The compiled model's logits on ``ids`` and the per-FFN counters of that call."""
    with torch.no_grad(), tc.collect_stats() as stats:
        out = logits(compiled(ids))
    return out, stats.ffns


def _ran_dense(counters, tokens: int) -> bool:
    """Every FFN ran the dense FFN on all ``tokens`` tokens, and none took the pack."""
    return bool(counters) and all((c.calls, c.tokens, c.dense_calls, c.dense_tokens) == (0, 0, 1, tokens)
                                  for c in counters.values())


def _ran_pack(counters, tokens: int) -> bool:
    """Every FFN took the pack on all ``tokens`` tokens, and none ran dense."""
    return bool(counters) and all((c.calls, c.tokens, c.dense_calls, c.dense_tokens) == (1, tokens, 0, 0)
                                  for c in counters.values())


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def test_auto_runs_prefill_dense_and_decode_on_the_pack(budget_profiles):
    model = build_tiny("gpt2")
    compiled = torch.compile(model, backend="tardis", options={"profile": budget_profiles["gpt2"], "inner": "eager"})
    prefill, decode = _ids(2, 16), _ids(1, 1)  # 32 tokens per call (> 16, fp32's figure), then 1
    with torch.no_grad():
        expected_prefill, expected_decode = logits(model(prefill)), logits(model(decode))
    got, counters = _run(compiled, prefill)
    assert len(counters) == 2 and _ran_dense(counters, 32), counters
    torch.testing.assert_close(got, expected_prefill, atol=1e-5, rtol=1e-5)
    got, counters = _run(compiled, decode)
    assert len(counters) == 2 and _ran_pack(counters, 1), counters
    assert all(c.flagged > 0 for c in counters.values())  # the guard ran
    assert _rel(got, expected_decode) > 0  # the approximation, not the dense FFN


def test_none_runs_every_token_on_the_pack(budget_profiles):
    model = build_tiny("gpt2")
    options = {"profile": budget_profiles["gpt2"], "inner": "eager", "dense_above": None}
    ids = _ids(2, 16)
    got, counters = _run(torch.compile(model, backend="tardis", options=options), ids)
    assert len(counters) == 2 and _ran_pack(counters, 32), counters
    with torch.no_grad():
        assert 0 < _rel(got, logits(model(ids))) < 0.5


def test_an_int_threshold_is_strict(budget_profiles):
    model = build_tiny("gpt2")
    compiled = torch.compile(model, backend="tardis", options={"profile": budget_profiles["gpt2"], "inner": "eager",
                                                                "dense_above": 8})
    _, counters = _run(compiled, _ids(1, 8))
    assert _ran_pack(counters, 8), counters  # 8 tokens: not above 8
    ids = _ids(1, 9)
    got, counters = _run(compiled, ids)
    assert _ran_dense(counters, 9), counters
    with torch.no_grad():
        torch.testing.assert_close(got, logits(model(ids)), atol=1e-5, rtol=1e-5)


def test_zero_runs_every_call_dense(budget_profiles):
    compiled = torch.compile(build_tiny("gpt2"), backend="tardis",
                             options={"profile": budget_profiles["gpt2"], "inner": "eager", "dense_above": 0})
    _, counters = _run(compiled, _ids(1, 1))
    assert _ran_dense(counters, 1), counters


def test_auto_in_bfloat16_runs_dense_above_4_tokens():
    assert dense_above_for(torch.bfloat16) == 4  # two threads: the 5-token call below is above it
    model = build_tiny("llama", dtype=torch.bfloat16)
    profile = tc.calibrate_for_budget(model, token_batches(3), 0.5, config=QUIET)
    compiled = torch.compile(model, backend="tardis", options={"profile": profile, "inner": "eager"})
    ids = _ids(1, 5)
    got, counters = _run(compiled, ids)
    assert len(counters) == 2 and _ran_dense(counters, 5), counters
    with torch.no_grad():
        # nn.Linear and silu: the dense path runs the model's own bf16 ops (measured equal). GPT-2's
        # spelled-out tanh GELU would differ by bf16 rounding from the activation rule's F.gelu.
        torch.testing.assert_close(got, logits(model(ids)))
    _, counters = _run(compiled, _ids(1, 4))
    assert len(counters) == 2 and _ran_pack(counters, 4), counters


def test_dense_path_under_inductor_equals_eager_dense(budget_profiles):
    model = build_tiny("llama")
    compiled = torch.compile(model, backend="tardis", options={"profile": budget_profiles["llama"]})  # inductor
    ids = _ids(2, 16)
    got, counters = _run(compiled, ids)
    assert len(counters) == 2 and _ran_dense(counters, 32), counters
    with torch.no_grad():
        torch.testing.assert_close(got, logits(model(ids)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch,view", [
    ("llama", None),  # gated, separate nn.Linear gate / up / down: the weights as they are
    ("gpt2", ".t()"),  # plain, Conv1D (x @ W, weight (in, out)): transposed views
    ("phi3", "narrow"),  # gated, one fused gate_up linear: row blocks of it
])
def test_dense_path_is_exact_on_each_weight_layout(arch, view, budget_profiles):
    model = build_tiny(arch)
    reports = []
    compiled = torch.compile(model, backend=TardisCompiler(
        tc.TardisOptions(profile=budget_profiles[arch], inner="eager"), reports=reports))
    ids = _ids(2, 16)
    got, counters = _run(compiled, ids)
    assert len(counters) == 2 and _ran_dense(counters, 32), counters
    with torch.no_grad():
        torch.testing.assert_close(got, logits(model(ids)), atol=1e-5, rtol=1e-5)
    code = reports[0].code
    assert code.count("tardis.ffn") == 2
    if view is not None:
        assert view in code, code


@pytest.mark.parametrize("bad", [-1, "fast", 1.5, True, "16", [4]])
def test_bad_values_are_value_errors_that_name_dense_above(bad):
    with pytest.raises(ValueError, match="dense_above"):
        tc.TardisOptions.from_mapping({"dense_above": bad})


@pytest.mark.parametrize("good", ["auto", None, 0, 4, 10_000])
def test_good_values_are_kept(good):
    assert tc.TardisOptions.from_mapping({"dense_above": good}).dense_above == good


def test_explain_says_when_the_measured_calls_ran_dense(budget_profiles):
    model, ids = build_tiny("gpt2"), _ids(2, 16)
    report = tc.explain(model, ids, profile=budget_profiles["gpt2"], inner="eager")  # "auto": 32 tokens run dense
    assert [row.status for row in report.ffns] == ["rewritten"] * 2
    assert all(row.runtime_flag_rate is None and row.runtime_corrected_rate is None for row in report.ffns)
    note = "calls of 32 tokens ran the dense FFN (dense_above='auto': 16 in float32)"
    assert any(note in n and "pass dense_above=None" in n for n in report.graphs[0].notes), report.graphs[0].notes
    assert "pass dense_above=None to measure the approximation on these inputs" in str(report)
    torch.compiler.reset()
    report = tc.explain(model, ids, profile=budget_profiles["gpt2"], inner="eager", dense_above=None)
    assert all(row.runtime_flag_rate is not None and 0 < row.runtime_flag_rate < 1 for row in report.ffns)
    assert not any("dense_above" in n for g in report.graphs for n in g.notes)


def test_explain_notes_ffns_whose_calls_were_partly_dense():
    from tardis_compiler.explain import _fill_measured
    from tardis_compiler.report import FFNReport, GraphReport
    from tardis_compiler.runtime.stats import FFNCounters

    rows = [FFNReport(name, "p", "gelu", "rewritten", dtype="bfloat16") for name in ("a", "b", "c")]
    graph = GraphReport(0, "int8", ffns=rows)
    measured = {"a": FFNCounters(calls=1, tokens=2, neurons=10, flagged=5, dense_calls=3, dense_tokens=96),
                "b": FFNCounters(neurons=10, dense_calls=2, dense_tokens=64), "c": FFNCounters(calls=1, tokens=1,
                                                                                           neurons=10, flagged=1)}
    _fill_measured(graph, measured, tc.TardisOptions())
    assert [r.runtime_flag_rate for r in rows] == [0.25, None, 0.1]
    assert graph.notes == [
        "a: 3 of 4 calls of 32 tokens ran the dense FFN (dense_above='auto': 4 in bfloat16); its measured flag "
        "rate counts the other 1",
        "b: calls of 32 tokens ran the dense FFN (dense_above='auto': 4 in bfloat16): flag rate not measured on "
        "these inputs (the table shows calibration's); pass dense_above=None to measure the approximation on these "
        "inputs"]
