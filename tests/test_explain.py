"""explain: what the backend rewrote, and what it did not consider."""
import tardis_compiler as tc
from tardis_compiler.moe import ROUTED_EXPERTS_REASON
from tests.tiny_models import build_tiny_moe, token_batches


def test_routed_moe_experts_are_noted_as_not_considered():
    """A skipped pattern (the MoE block: its router beside the experts) is no found FFN and covers
    nothing: the routed experts are listed under the table."""
    model, (x,) = build_tiny_moe(), token_batches(1)
    report = tc.explain(model, x, inner="eager", calibration_calls=1)
    rewritten = [f.name for f in report.ffns if f.status == "rewritten"]
    assert rewritten == [f"model.layers.{i}.mlp.shared_expert" for i in range(2)]
    assert report.not_considered == [(f"model.layers.{i}.mlp.experts", ROUTED_EXPERTS_REASON) for i in range(2)]
    assert f"not considered: model.layers.1.mlp.experts ({ROUTED_EXPERTS_REASON})" in str(report)
    assert report.to_dict()["not_considered"][0]["module"] == "model.layers.0.mlp.experts"
