"""Splitting a pack by neurons across tensor-parallel ranks: the ranks' outputs add up to the pack's."""
from __future__ import annotations

import random

import pytest
import torch

from tardis_compiler.runtime.ffn_op import ffn
from tardis_compiler.runtime.shard import shard_pack
from tests.runtime.pack_cases import Case, make

GUARDS = ("int8", "int4", "int2", "exact", "svd", "all")
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _cases(n: int, seed: int) -> list[tuple[Case, int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        case = Case(kind=rng.choice(["plain", "gated"]), d_in=rng.choice([5, 16, 33, 64]), d_out=rng.choice([3, 16]),
                    m=rng.choice([1, 7, 40, 97]), guard=rng.choice(GUARDS), dtype=rng.choice([torch.float32,
                                                                                              torch.bfloat16]),
                    bias=rng.random() < 0.5, frac_guarded=rng.choice([0.0, 0.5, 1.0]),
                    frac_always=rng.choice([0.0, 0.2, 1.0]), lines=rng.random() < 0.8, group=rng.choice([8, 16]),
                    rank=rng.choice([1, 3]), seed=100 + i)
        if case.guard not in ("exact", "all") and rng.random() < 0.5:
            case.bundles = "int8"
            if rng.random() < 0.5:
                case.weights_encoding = rng.choice(["int8", "int4"])
        out.append((case, rng.choice([1, 2, 3, 4])))
    return out


@pytest.mark.parametrize("case,world", _cases(48, seed=1),
                         ids=lambda v: v.tag if isinstance(v, Case) else f"tp{v}")
def test_shards_add_up_to_the_pack(case, world):
    _, _, x, pack = make(case, tokens=5)
    want = ffn(x, pack)
    shards = [shard_pack(pack, r, world) for r in range(world)]
    got = sum(s(x).float() for s in shards)
    scale = max(1.0, want.float().abs().max().item())
    torch.testing.assert_close(got / scale, want.float() / scale, **TOL[case.dtype])
    # every bundled neuron lands on exactly one rank
    kept = torch.cat([s.pack.neurons for s in shards])
    assert sorted(kept.tolist()) == sorted(pack.neurons.tolist())


def test_each_rank_holds_about_its_share():
    case = Case(kind="gated", d_in=64, d_out=64, m=256, guard="int4", frac_guarded=0.6, frac_always=0.2,
                bundles="int8", weights_encoding="int8")
    _, _, _, pack = make(case, tokens=4)
    whole = pack.layout.resident_bytes()
    for world in (2, 4):
        held = [shard_pack(pack, r, world).resident_bytes() for r in range(world)]
        # each rank's share is within a few percent of 1/world (the svd P and meta are per rank)
        assert max(held) < whole / world * 1.1, (held, whole)


def test_bad_rank_or_world_is_a_clear_error():
    _, _, _, pack = make(Case(kind="plain", d_in=8, d_out=8, m=16), tokens=2)
    with pytest.raises(ValueError, match="rank must be"):
        shard_pack(pack, 2, 2)
    with pytest.raises(ValueError, match="world must be"):
        shard_pack(pack, 0, 0)
