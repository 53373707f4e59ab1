"""The fold pass leaves one fused op per FFN and nothing of the FFN body; the record pass adds hooks only."""
import torch

from tardis_compiler.calibrate.record import record_ffn_input
from tardis_compiler.options import TardisOptions
from tardis_compiler.passes import PassContext, copy_graph_module, find_ffns, fold_ffns, placeholder_fqns, record_ffn_inputs
from tardis_compiler.passes import capture_graphs
from tests.tiny_models import LAYERS, build_tiny, token_batches

FUSED = torch.ops.tardis.ffn.default


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def _pipeline(arch):
    (gm, fqns), = capture_graphs(build_tiny(arch), token_batches(1)[0])
    matches, _ = find_ffns(gm, fqns)
    return gm, PassContext(TardisOptions(), {m.name for m in matches})


def test_fold_expected_and_unexpected_ops(tiny_arch):
    gm, ctx = _pipeline(tiny_arch)
    before = _targets(gm)
    folded = fold_ffns(copy_graph_module(gm), ctx)
    after = _targets(folded)
    assert after.count(FUSED) == LAYERS  # expected_ops
    unexpected = {torch._C._nn.gelu, torch.nn.functional.gelu, torch.nn.functional.relu}
    if tiny_arch in ("gpt2", "bloom"):  # formula GELUs: their tanh is the only tanh in the graph
        unexpected.add(torch.tanh)
    assert not unexpected & set(after), "activation ops survived the fold"
    assert unexpected & set(before), "the test must look for ops the model really has"
    assert len(folded.meta["tardis_folded"]) == LAYERS
    placeholders = [n.name for n in folded.graph.find_nodes(op="placeholder")]
    assert placeholders[-4 * LAYERS:] == [f"tardis_{part}_{i}" for i in range(LAYERS)
                                          for part in ("weights", "guard", "floats", "meta")]
    assert len(ctx.log) == LAYERS


def test_fold_removes_ffn_linears():
    gm, ctx = _pipeline("bert")
    linears = lambda g: sum(t is torch._C._nn.linear for t in _targets(g))  # noqa: E731
    folded = fold_ffns(copy_graph_module(gm), ctx)
    assert linears(folded) == linears(gm) - 2 * LAYERS
    assert _targets(folded).count(torch._C._nn.gelu) == 0


def test_fold_leaves_original_graph_untouched():
    gm, ctx = _pipeline("opt")
    code = gm.code
    fold_ffns(copy_graph_module(gm), ctx)
    assert gm.code == code


def test_record_pass_adds_one_hook_per_ffn():
    gm, ctx = _pipeline("gpt2")
    recording = record_ffn_inputs(copy_graph_module(gm), ctx, record_ffn_input)
    assert _targets(recording).count(record_ffn_input) == LAYERS
    assert len(_targets(recording)) == len(_targets(gm)) + LAYERS
