"""The ``tardis::ffn`` op: the fused CPU kernel against the torch path over odd shapes, guards,
dtypes and thread counts; ``guard="all"`` against the dense FFN; opcheck; run-time counters."""
from __future__ import annotations

import random
import re

import pytest
import torch
import torch.nn.functional as F

from tardis_compiler.activations import get_activation_rule
from tardis_compiler.runtime import ffn_op
from tardis_compiler.runtime.cpu.kernel import kernel
from tardis_compiler.runtime.layout import FIELD, KERNEL_ACTIVATIONS
from tardis_compiler.runtime.pack import build_pack, dense_reference, guard_all_params, neuron_classes
from tardis_compiler.runtime.quantize import reference_weights
from tardis_compiler.runtime.stats import collect_stats
from tardis_compiler.runtime.torch_path import ffn_exact, ffn_torch
from tests.runtime.pack_cases import Case, case_params, guard_predictions_with_bias, make

needs_kernel = pytest.mark.skipif(kernel() is None, reason="the fused CPU kernel cannot be built here")
GUARDS = ("int8", "int4", "int2", "exact", "svd", "all")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _kernel_out(x: torch.Tensor, pack, threads: int) -> torch.Tensor:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = torch.empty(x.shape[0], pack.layout.d_out, dtype=x.dtype)
        kernel().ffn(x, y, *pack.tensors(), KERNEL_ACTIVATIONS[pack.activation])
        return y
    finally:
        torch.set_num_threads(before)


def _scale(y: torch.Tensor) -> float:
    return max(1.0, y.float().abs().max().item())


def _random_cases(n: int, seed: int) -> list[tuple[Case, int, int]]:
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        case = Case(kind=rng.choice(["plain", "gated"]), d_in=rng.choice([1, 5, 16, 17, 33, 64, 130]),
                    d_out=rng.choice([1, 3, 16, 31]), m=rng.choice([1, 2, 7, 40, 97]), guard=rng.choice(GUARDS),
                    activation=rng.choice(["silu", "gelu", "gelu_tanh", "relu", "quick_gelu"]),
                    dtype=rng.choice([torch.float32, torch.bfloat16]), bias=rng.random() < 0.5,
                    frac_guarded=rng.choice([0.0, 0.5, 1.0]), frac_always=rng.choice([0.0, 0.2, 1.0]),
                    lines=rng.random() < 0.7, group=rng.choice([8, 16, 64]), rank=rng.choice([1, 3]), seed=i)
        if case.guard != "exact" and rng.random() < 0.4:
            case.bundles = "int8"
            if rng.random() < 0.5:
                case.weights_encoding = rng.choice(["int8", "int4"])
        cases.append((case, rng.choice([1, 2, 5, 8]), rng.choice([1, 2])))
    return cases


@needs_kernel
@pytest.mark.parametrize("case,tokens,threads", _random_cases(160, seed=0),
                         ids=lambda v: v.tag if isinstance(v, Case) else str(v))
def test_kernel_matches_torch_path(case, tokens, threads):
    """Seeded fuzz: odd d, m below the thread count, no guarded / all guarded / all exact neurons."""
    check_kernel(case, tokens, threads)


#: The "exact" guard over a quantized pack's own first rows (int8: widened; int4: dequantized once).
EXACT_QUANTIZED = [(Case(kind, d, n, m, guard="exact", weights_encoding=enc, dtype=dtype, seed=s), tokens, threads)
                   for s, (kind, d, n, m, enc, dtype, tokens, threads) in enumerate([
                       ("gated", 64, 40, 50, "int4", torch.float32, 1, 1), ("gated", 70, 31, 97, "int4", torch.bfloat16, 5, 2),
                       ("plain", 33, 16, 40, "int4", torch.float32, 8, 2), ("gated", 17, 3, 7, "int8", torch.bfloat16, 1, 1),
                       ("plain", 130, 31, 97, "int8", torch.float32, 2, 2)])]


@needs_kernel
@pytest.mark.parametrize("case,tokens,threads", EXACT_QUANTIZED, ids=lambda v: v.tag if isinstance(v, Case) else str(v))
def test_kernel_exact_guard_over_quantized_rows_matches_torch_path(case, tokens, threads):
    check_kernel(case, tokens, threads)


def check_kernel(case: Case, tokens: int, threads: int) -> None:
    """The fused kernel computes what the torch path does, flags included."""
    _, _, x, pack = make(case, tokens)
    expected, _ = ffn_torch(x, *pack.tensors(), pack.layout)
    got = _kernel_out(x, pack, threads)
    tol = TOL[case.dtype]
    torch.testing.assert_close(got.float() / _scale(expected), expected.float() / _scale(expected), **tol)


def check_exact_all(fused, case: Case, tokens: int, threads: int = 1) -> None:
    """The kernel's exact_all mode (no guard, every bundle exact) computes ``ffn_exact``'s function."""
    _, _, _, pack = make(case, 4)
    x = case.inputs(tokens)
    expected = ffn_exact(x, pack.weights, pack.guard, pack.floats, pack.layout)
    got = torch.empty_like(expected)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused.ffn(x, got, *pack.tensors(), KERNEL_ACTIVATIONS[pack.activation], exact_all=True)
    finally:
        torch.set_num_threads(before)
    scale = _scale(expected)
    torch.testing.assert_close(got.float() / scale, expected.float() / scale, **TOL[case.dtype],
                               msg=lambda m: f"{case}, {tokens} tokens: {m}")


#: Wide outputs (the 64-column passes of the down projection and their tails) and more neurons than a block.
WIDE_CASES = [Case("gated", 70, 131, 90, guard="int4", bundles="int8", dtype=torch.bfloat16),
              Case("plain", 33, 64, 41, guard="int8", activation="gelu"),
              Case("gated", 64, 200, 23, guard="int4", weights_encoding="int8"),
              Case("gated", 70, 131, 37, guard="int8", weights_encoding="int4", dtype=torch.bfloat16),
              Case("gated", 64, 40, 50, guard="exact", weights_encoding="int4"),
              Case("plain", 40, 33, 29, guard="exact", weights_encoding="int8", activation="gelu"),
              Case("plain", 17, 257, 9, guard="all", dtype=torch.bfloat16, activation="relu")]


@needs_kernel
@pytest.mark.parametrize("case,tokens,threads", [(c, t, th) for (c, _, th), t in
                                                 zip(_random_cases(60, seed=5), [1, 3, 4, 8, 13, 64] * 10)]
                         + [(c, t, 1 + i % 2) for i, c in enumerate(WIDE_CASES) for t in (5, 64)],
                         ids=lambda v: v.tag if isinstance(v, Case) else str(v))
def test_kernel_exact_all_matches_ffn_exact(case, tokens, threads):
    """Seeded fuzz of the calls above dense_above: token counts across the kernel's 8- and 4-token
    blocks and their tails, bundle blocks cut short, int8 and model-dtype bundles, quantized packs."""
    check_exact_all(kernel(), case, tokens, threads)


@needs_kernel
@pytest.mark.parametrize("guard", ["int4", "int2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_subbyte_guard_over_more_groups_than_one_scale_block(guard, dtype):
    check_one_token_guard(kernel(), guard, dtype)


def check_one_token_guard(fused, guard: str, dtype: torch.dtype) -> None:
    """With 18 groups of 64 (the last partial: more than the kernel prepares in one vector step of
    group scales, 16 with AVX-512 and 8 with AVX2), each guarded neuron's band sits within 0.1% of
    the torch guard's prediction, half of them just around it and half just above it: ``fused``
    flags exactly the second half only if its one-token prediction is the torch guard's to 0.1%."""
    case = Case("gated", 64 * 17 + 6, 24, 60, guard=guard, dtype=dtype, group=64, frac_guarded=0.8,
                frac_always=0.0)
    weights, x = case.weights(), case.inputs(1)
    params = case_params(case, weights, x)
    guarded = torch.zeros(case.m, dtype=torch.bool)
    guarded[neuron_classes(params, guard, case.m)[0]] = True
    z = guard_predictions_with_bias(case, weights, params, x)[0]
    eps = 1e-3 * z.abs() + 1e-5
    outside = torch.arange(case.m) % 2 == 1
    lo, hi = torch.where(outside, z + eps, z - eps), torch.where(outside, z + 2 * eps, z + eps)
    for row, band in ((2, lo), (4, lo), (3, hi), (5, hi)):
        params[row, guarded] = band[guarded]
    pack = build_pack(case.kind, weights, params, guard, case.activation, case.group)
    expected, flags = ffn_torch(x, *pack.tensors(), pack.layout)
    got = torch.empty_like(expected)
    counters = torch.zeros(3, dtype=torch.int64)
    fused.ffn(x, got, *pack.tensors(), KERNEL_ACTIVATIONS[pack.activation], counters)
    want = int((guarded & outside).sum())
    assert 0 < want < case.m and int(flags.sum()) == want
    assert int(counters[0]) == want
    torch.testing.assert_close(got.float() / _scale(expected), expected.float() / _scale(expected), **TOL[dtype])


@needs_kernel
@pytest.mark.parametrize("kind", ["plain", "gated"])
@pytest.mark.parametrize("k", ["none", "all"])
def test_kernel_with_no_bundles_and_with_every_neuron_bundled(kind, k):
    case = Case(kind, 40, 24, 50, guard="int4", frac_guarded=0.0 if k == "none" else 0.5,
                frac_always=0.0 if k == "none" else 0.5)
    _, _, x, pack = make(case, 3)
    assert pack.layout.k_bundles == (0 if k == "none" else 50)
    expected, _ = ffn_torch(x, *pack.tensors(), pack.layout)
    torch.testing.assert_close(_kernel_out(x, pack, 2), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["plain", "gated"])
@pytest.mark.parametrize("tokens", [1, 3, ffn_op.FUSED_MAX_TOKENS + 5])
@pytest.mark.parametrize("bias", [True, False])
def test_guard_all_reproduces_the_dense_ffn_fp32(kind, tokens, bias):
    case = Case(kind, 33, 20, 70, guard="all", bias=bias)
    w, params, x, pack = make(case, tokens)
    act = get_activation_rule(case.activation).fn
    dense = dense_reference(kind, w, act, x)
    torch.testing.assert_close(ffn_op.ffn(x, pack), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["plain", "gated"])
def test_guard_all_reproduces_the_dense_ffn_bf16(kind):
    """Within bf16 rounding: the measured error is the dense bf16 FFN's own rounding, or less."""
    case = Case(kind, 64, 48, 128, guard="all", dtype=torch.bfloat16)
    w, params, x, pack = make(case, 4)
    act = get_activation_rule(case.activation).fn
    exact = dense_reference(kind, {k: v.double() if v is not None else None for k, v in w.items()}, act, x.double())
    dense_bf16 = dense_reference(kind, w, act, x)
    ours = ffn_op.ffn(x, pack)
    own = (ours.double() - exact).norm() / exact.norm()
    dense_err = (dense_bf16.double() - exact).norm() / exact.norm()
    assert own < 8e-3 and own <= 2 * dense_err + 1e-3, (own, dense_err)


@pytest.mark.parametrize("kind", ["plain", "gated"])
@pytest.mark.parametrize("tokens", [1, 3, ffn_op.FUSED_MAX_TOKENS + 5])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("encoding", ["int8", "int4"])
def test_guard_all_quantized_pack_reproduces_the_quantized_reference(kind, tokens, threads, encoding):
    """The exactness invariant of a quantized pack: the dense FFN of its int8 / int4 weights,
    computed in float64, within float32 rounding (kernel for few tokens, torch path beyond)."""
    case = Case(kind, 33, 20, 70, guard="all", weights_encoding=encoding)
    w, _, x, pack = make(case, tokens)
    assert pack.layout.weights == encoding and pack.weights.numel() == 0  # every weight is in the quantized region
    act = get_activation_rule(case.activation).fn
    ref = reference_weights(kind, w, encoding)
    exact = dense_reference(kind, {k: v.double() if v is not None else None for k, v in ref.items()}, act, x.double())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = ffn_op.ffn(x, pack)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got.double(), exact, atol=1e-5, rtol=1e-5)
    assert (got.double() - dense_reference(kind, {k: v.double() if v is not None else None for k, v in w.items()},
                                           act, x.double())).abs().max() > 1e-4  # the reference is not the float FFN


def test_output_of_a_token_does_not_depend_on_its_batch():
    case = Case("gated", 32, 32, 64, guard="int8")
    _, _, x, pack = make(case, 12)
    together = ffn_op.ffn(x, pack)  # more than FUSED_MAX_TOKENS: the torch path
    alone = torch.cat([ffn_op.ffn(x[i:i + 1], pack) for i in range(12)])  # the kernel
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_leading_dims_and_strided_inputs():
    case = Case("plain", 15, 9, 30, guard="int8", activation="gelu")
    _, _, x, pack = make(case, 6)
    expected = ffn_op.ffn(x, pack)
    torch.testing.assert_close(ffn_op.ffn(x.reshape(2, 3, 15), pack), expected.reshape(2, 3, 9))
    strided = x.t().contiguous().t()  # same values, last dimension strided
    assert not strided.is_contiguous()
    torch.testing.assert_close(ffn_op.ffn(strided, pack), expected)


def test_custom_activation_runs_the_torch_path():
    from tardis_compiler.activations import register_activation_rule, unregister_activation_rule

    register_activation_rule("softsign_op_test", lambda z: z / (1 + z.abs()))
    try:
        case = Case("plain", 16, 8, 20, guard="all", activation="softsign_op_test")
        w, _, x, pack = make(case, 1)
        dense = dense_reference("plain", w, lambda z: z / (1 + z.abs()), x)
        torch.testing.assert_close(ffn_op.ffn(x, pack), dense, atol=1e-5, rtol=1e-5)
    finally:
        unregister_activation_rule("softsign_op_test")


@pytest.mark.parametrize("guard,quantized", [(g, "dense") for g in GUARDS] + [("int4", "int8"), ("all", "int8"),
                                                              ("int8", "int4"), ("all", "int4")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(guard, quantized, dtype):
    case = Case("gated", 16, 8, 24, guard=guard, dtype=dtype, weights_encoding=quantized)
    w, _, x, pack = make(case, 2)
    for tokens in (1, ffn_op.FUSED_MAX_TOKENS + 1):
        for dense_above, dense in ((-1, []), (0, _linear_layout("gated", w)), (0, [])):  # (0, []): every bundle exact
            args = (case.inputs(tokens), *pack.tensors(), 8, case.activation, "opcheck", dense_above, dense)
            torch.library.opcheck(torch.ops.tardis.ffn.default, args)


def _linear_layout(kind: str, w: dict) -> list:
    """The FFN's weights as the op's dense path takes them (nn.Linear layout)."""
    if kind == "gated":
        return [w["wg_rows"], w["bg"], w["wu_rows"], w["bu"], w["wd_rows"].t(), w["bd"]]
    return [w["w1_rows"], w["b1"], w["w2_rows"].t(), w["b2"]]


@pytest.mark.parametrize("kind", ["plain", "gated"])
def test_calls_above_dense_above_run_the_dense_ffn_and_count_apart(kind):
    case = Case(kind, 16, 8, 24, guard="int8", frac_always=0.1, frac_guarded=0.5)
    w, _, x, pack = make(case, 3)
    act = get_activation_rule(case.activation).fn
    dense = _linear_layout(kind, w)
    with collect_stats() as stats:
        short = ffn_op.ffn(x[:3], pack, "layer", dense_above=3, dense=dense)
        long = ffn_op.ffn(case.inputs(4), pack, "layer", dense_above=3, dense=dense)
    torch.testing.assert_close(short, ffn_op.ffn(x[:3], pack))  # 3 tokens: the pack
    torch.testing.assert_close(long, dense_reference(kind, w, act, case.inputs(4)), atol=1e-5, rtol=1e-5)
    counters = stats.ffns["layer"]
    assert (counters.calls, counters.tokens, counters.dense_calls, counters.dense_tokens) == (1, 3, 1, 4)


@needs_kernel
def test_counters_match_the_torch_paths_flags():
    case = Case("gated", 48, 16, 90, guard="int4", frac_always=0.1, frac_guarded=0.7)
    _, _, x, pack = make(case, 4)
    _, flags = ffn_torch(x, *pack.tensors(), pack.layout)
    with collect_stats() as stats:
        ffn_op.ffn(x, pack, name="layer")
    counters = stats.ffns["layer"]
    assert counters.flagged == int(flags.sum()) and counters.corrected == int(flags.any(0).sum())
    assert counters.neurons == 90 and counters.tokens == 4


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_honours_torch_threads(threads):
    case = Case("plain", 16, 8, 200, guard="int8")
    _, _, x, pack = make(case, 1)
    counters = torch.zeros(3, dtype=torch.int64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        kernel().ffn(x, torch.empty(1, 8), *pack.tensors(), KERNEL_ACTIVATIONS[pack.activation], counters)
    finally:
        torch.set_num_threads(before)
    assert counters[2] == threads


@needs_kernel
def test_one_openmp_runtime_is_mapped():
    case = Case("gated", 16, 8, 20, guard="int8")
    _, _, x, pack = make(case, 1)
    _kernel_out(x, pack, 2)
    with open("/proc/self/maps") as f:
        gomp = {line.split()[-1] for line in f if "libgomp" in line.rsplit("/", 1)[-1]}
    # Other wheels may vendor their own renamed copy (auditwheel: libgomp-<hash>.so, e.g. sentencepiece's,
    # which transformers loads when it is installed); the kernel links torch's file by path, never one of those.
    ours = {path for path in gomp if not re.search(r"libgomp-[0-9a-f]{8}\.so", path.rsplit("/", 1)[-1])}
    assert len(ours) == 1, gomp


@needs_kernel
def test_kernel_refuses_a_corrupt_pack():
    case = Case("gated", 16, 8, 20, guard="int8")
    _, _, x, pack = make(case, 1)
    meta = pack.meta.clone()
    meta[FIELD["N_WEIGHTS"]] += 1  # no longer the weights' size
    with pytest.raises(ValueError, match="sizes"):
        kernel().ffn(x, torch.empty(1, 8), pack.weights, pack.guard, pack.floats, meta, KERNEL_ACTIVATIONS["silu"])
    with pytest.raises(ValueError, match="features"):
        kernel().ffn(torch.randn(1, 17), torch.empty(1, 8), *pack.tensors(), KERNEL_ACTIVATIONS["silu"])


def test_dtype_mismatch_is_a_clear_error():
    case = Case("plain", 16, 8, 20, guard="all")
    _, _, x, pack = make(case, 1)
    with pytest.raises(ValueError, match="dtype it was compressed in"):
        ffn_op.ffn(x.double(), pack)


def test_float64_runs_the_torch_path_in_float64():
    w = {"w1_rows": torch.randn(30, 12, dtype=torch.float64), "b1": torch.randn(30, dtype=torch.float64),
         "w2_rows": torch.randn(30, 7, dtype=torch.float64), "b2": torch.randn(7, dtype=torch.float64)}
    pack = build_pack("plain", w, guard_all_params(30), "all", "gelu", 64)
    x = torch.randn(2, 12, dtype=torch.float64)
    torch.testing.assert_close(ffn_op.ffn(x, pack), dense_reference("plain", w, F.gelu, x), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", ["plain", "gated"])
@pytest.mark.parametrize("tokens", [1, 6, ffn_op.FUSED_MAX_TOKENS + 3])
def test_exact_guard_computes_the_documented_function(kind, tokens):
    """Independent of the pack: with the exact guard, a guarded neuron uses its line (plain) or
    constant (gated) inside [lower, upper] and the exact activation outside it; always-exact
    neurons are exact, the rest always use the line."""
    case = Case(kind, 24, 12, 60, guard="exact", frac_guarded=0.6, frac_always=0.2)
    w, params, x, pack = make(case, tokens)
    act = get_activation_rule(case.activation).fn
    w64 = {k: v.double() if v is not None else None for k, v in w.items()}
    x64, p = x.double(), params.double()
    a, c, lower, upper = p[0], p[1], p[2], p[3]
    first = F.linear(x64, w64["wg_rows" if kind == "gated" else "w1_rows"], w64["bg" if kind == "gated" else "b1"])
    exact = (first < lower) | (first > upper)  # empty range: always; unbounded: never
    if kind == "gated":
        u = F.linear(x64, w64["wu_rows"], w64["bu"])
        hidden = torch.where(exact, act(first), c) * u
        expected = F.linear(hidden, w64["wd_rows"].t(), w64["bd"])
    else:
        hidden = torch.where(exact, act(first), a * first + c)
        expected = F.linear(hidden, w64["w2_rows"].t(), w64["b2"])
    torch.testing.assert_close(ffn_op.ffn(x, pack).double(), expected, atol=1e-4, rtol=1e-4)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None, derandomize=True)
@given(kind=st.sampled_from(["plain", "gated"]), d_in=st.integers(1, 40), d_out=st.integers(1, 24),
       m=st.integers(1, 70), guard=st.sampled_from(GUARDS), tokens=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       activation=st.sampled_from(["silu", "gelu", "gelu_tanh", "relu", "quick_gelu"]),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]))
def test_op_matches_the_torch_path_on_any_input_layout(kind, d_in, d_out, m, guard, tokens, dtype, activation,
                                                        layout):
    """Hypothesis (seeded, bounded): any shape, dtype, activation and input strides; the op's
    output equals the torch path's on the same values."""
    case = Case(kind, d_in, d_out, m, guard=guard, dtype=dtype, activation=activation, group=8)
    _, _, x, pack = make(case, tokens)
    if layout == "transposed":  # same values, last dimension strided
        x = x.t().contiguous().t()
    elif layout == "sliced":  # a view into a wider tensor
        wide = torch.zeros(tokens, d_in + 3, dtype=dtype)
        wide[:, 1:d_in + 1] = x
        x = wide[:, 1:d_in + 1]
    expected, _ = ffn_torch(x.contiguous(), *pack.tensors(), pack.layout)
    got = ffn_op.ffn(x, pack)
    torch.testing.assert_close(got.float() / _scale(expected), expected.float() / _scale(expected), **TOL[dtype])


def test_dense_above_auto_follows_the_threads_the_call_runs_on():
    """The measured crossover depends on the compute threads (vLLM's worker computes on one): "auto"
    is resolved per call, for the threads torch runs on then."""
    table = ffn_op.DENSE_ABOVE[torch.bfloat16]
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 64):
            torch.set_num_threads(count)
            expected = table[max((t for t in table if t <= count), default=min(table))]
            assert ffn_op.dense_above_for(torch.bfloat16) == expected == ffn_op.dense_above_for(torch.bfloat16, count)
    finally:
        torch.set_num_threads(threads)
    assert ffn_op.dense_above_for(torch.float16, 1) == ffn_op.DENSE_ABOVE[torch.float32][1]
