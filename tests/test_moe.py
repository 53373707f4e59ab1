"""moe.routed_experts: which modules hold routed-expert weights no found FFN covers."""
import torch

from tardis_compiler.moe import ROUTED_EXPERTS_REASON, routed_experts


class FusedExperts(torch.nn.Module):
    """transformers 5 style: every expert's matrices stacked in 3-D parameters."""

    def __init__(self, experts: int = 4, d: int = 8, m: int = 16) -> None:
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.zeros(experts, 2 * m, d))
        self.down_proj = torch.nn.Parameter(torch.zeros(experts, d, m))


def _mlp(d: int = 8, m: int = 16) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(d, m), torch.nn.GELU(), torch.nn.Linear(m, d))


def test_fused_experts_are_listed_by_their_weights_whatever_their_name():
    block = torch.nn.ModuleDict({"moe": FusedExperts(), "shared_expert": _mlp()})
    assert routed_experts(block, ["shared_expert"]) == [("moe", ROUTED_EXPERTS_REASON)]
    assert routed_experts(torch.nn.ModuleDict({"layer": block}), ["layer"]) == []  # inside a found FFN


def test_experts_as_modules_list_those_not_found_one_by_one():
    block = torch.nn.ModuleDict({"experts": torch.nn.ModuleList([_mlp() for _ in range(3)]),
                                 "shared_experts": _mlp()})  # a shared expert is a dense FFN, never listed
    assert routed_experts(block, []) == [("experts", ROUTED_EXPERTS_REASON)]
    assert routed_experts(block, ["experts.1"]) == [("experts.0", ROUTED_EXPERTS_REASON),
                                                    ("experts.2", ROUTED_EXPERTS_REASON)]


def test_dense_models_and_convolutions_have_none():
    convs = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3), torch.nn.Conv1d(4, 4, 3), _mlp())
    assert routed_experts(convs, []) == []
    one = torch.nn.Module()
    one.table = torch.nn.Parameter(torch.zeros(2, 3, 4))  # a single 3-D parameter is no stack of experts
    assert routed_experts(one) == []
