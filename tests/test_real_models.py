"""The slow tier: the real offline models end to end (run with ``python -m pytest -m slow``;
about 10 minutes on 2 cores). Exactness with guard="all", the budget met, quality bounded."""
import pytest
import torch
import torch.nn.functional as F

import tardis_compiler as tc

pytestmark = pytest.mark.slow
QUIET = tc.CalibrationConfig(progress=False)


@pytest.fixture(scope="module")
def smollm2():
    from tardis_compiler.eval.corpus import calibration_batches, evaluation_windows, special_tokens
    from tardis_compiler.eval.models import load_smollm2

    model, tok = load_smollm2()
    batches = calibration_batches(tok, context_length=256, num_batches=8)
    windows = evaluation_windows(tok, context_length=256, num_windows=4)
    profile = tc.calibrate_for_budget(model, batches, 0.5, config=QUIET)
    return model, profile, windows, special_tokens(tok)[0]


def _run(model, ids, **options):
    torch.compiler.reset()
    # dense_above=None: the prompt's tokens take the pack too (the batched path), not the dense FFN.
    fast = torch.compile(model, backend="tardis", options={"inner": "eager", "dense_above": None, **options})
    with torch.no_grad():
        return fast(ids).logits


def test_smollm2_guard_all_reproduces_dense(smollm2):
    model, profile, windows, prefix = smollm2
    ids = torch.cat([torch.tensor(prefix, dtype=torch.long), windows[0][:64]])[None]
    with torch.no_grad():
        dense = model(ids).logits
    for tokens in (1, ids.shape[1]):  # the fused kernel (decode) and the batched path (prefill)
        got = _run(model, ids[:, :tokens], profile=profile, guard="all")
        torch.testing.assert_close(got, dense[:, :tokens], atol=1e-4, rtol=1e-4)


def test_smollm2_budget_is_met_and_perplexity_bounded(smollm2):
    from tardis_compiler.eval.metrics import perplexity

    model, profile, windows, prefix = smollm2
    assert profile.bytes_fraction() <= 0.5 + 0.01
    dense = perplexity(model, windows, prefix).value
    torch.compiler.reset()
    # dense_above=None: perplexity measures the approximation on every token of the 256-token windows.
    fast = torch.compile(model, backend="tardis", options={"profile": profile, "inner": "eager", "dense_above": None})
    folded = perplexity(fast, windows, prefix).value
    assert folded < 1.3 * dense, (folded, dense)


def test_minilm_guard_all_and_budget():
    from tardis_compiler.eval.corpus import calibration_batches
    from tardis_compiler.eval.models import load_minilm

    model, tok = load_minilm()
    batches = calibration_batches(tok, context_length=128, num_batches=8)
    profile = tc.calibrate_for_budget(model, batches, 0.5, config=QUIET)
    assert profile.bytes_fraction() <= 0.5 + 0.01
    ids = calibration_batches(tok, context_length=128, num_batches=1, seed=5)[0]
    with torch.no_grad():
        dense = model(ids).last_hidden_state
    torch.compiler.reset()
    pack = {"dense_above": None}  # 128-token inputs: measure the pack, not the dense FFN
    fast = torch.compile(model, backend="tardis", options={"inner": "eager", "profile": profile, "guard": "all", **pack})
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).last_hidden_state, dense, atol=1e-4, rtol=1e-4)
    torch.compiler.reset()
    fast = torch.compile(model, backend="tardis", options={"inner": "eager", "profile": profile, **pack})
    with torch.no_grad():
        cosine = F.cosine_similarity(fast(ids).last_hidden_state.mean(1), dense.mean(1)).item()
    assert cosine > 0.98


@pytest.mark.parametrize("other,ppl_bound,agree", [("int8", 1.01, 0.95), ("int4", 1.15, 0.75)])
def test_smollm2_other_linears_keep_perplexity_close(smollm2, other, ppl_bound, agree):
    """compress_(other_linears=...) with exact FFNs (guard="all"): what changes is the attention
    projections and the (tied, so untied) LM head quantized; int8 is within 1% of dense perplexity."""
    import copy

    from tardis_compiler.eval.metrics import perplexity
    from tardis_compiler.runtime.quantized_linear import quantize_int4

    model, profile, windows, prefix = smollm2
    quantized = copy.deepcopy(model)
    report = tc.compress_(quantized, profile, windows[0][None, :16], guard="all", other_linears=other)
    assert len(report.quantized) == 30 * 4 + 1 and report.quantized[-1].tied_to == "model.embed_tokens.weight"
    ids = torch.cat([torch.tensor(prefix, dtype=torch.long), windows[1][:64]])[None]
    with torch.no_grad():
        want, got = model(ids).logits, quantized(ids).logits
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= agree
    dense, ppl = perplexity(model, windows, prefix).value, perplexity(quantized, windows, prefix).value
    assert ppl < ppl_bound * dense, (ppl, dense)
    if other == "int4":  # the head's codes read back from torch's CPU layout at its real size (49152 x 576)
        assert torch.equal(quantized.lm_head.portable_qweight(), quantize_int4(model.lm_head.weight)[0])
