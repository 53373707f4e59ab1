"""benchmarks/peers.py's bookkeeping (row names, --rows, ratios, the table, skipped rows, byte
counts, the outside-load meter) without the ``bench`` extra; the parts that need torchao or
llama-cpp-python skip with the reason when they are not installed. The benchmark itself is run
by hand (``python benchmarks/peers.py --quick``): it needs SmolLM2 and minutes of CPU."""
import argparse
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import common  # noqa: E402
import peers  # noqa: E402


def _args(**kw):
    base = dict(tardis_budgets=[0.3, 0.5], tardis_weights=[None, "int8"], gguf_types=["BF16", "Q4_0"],
                llama_threads=[1, 2], new_tokens=8, prompts=1, prompt_tokens=32, rounds=1, ppl_windows=2,
                context=512, threads=2, tardis_resident=[])
    base.update(kw)
    return argparse.Namespace(**base)


def test_row_names_and_selection():
    names = peers.row_names(_args())
    assert names[:3] == ["dense", "torchao-int8", "torchao-int4"]
    assert {"tardis-0.3", "tardis-0.5-int8", "llama.cpp-BF16-1t", "llama.cpp-Q4_0-2t"} <= set(names)
    assert len(names) == 3 + 4 + 4
    picked = [n for n in names if peers.selected(n, ["dense", "LLAMA.CPP-*-1t"])]
    assert picked == ["dense", "llama.cpp-BF16-1t", "llama.cpp-Q4_0-1t"]
    assert all(peers.selected(n, None) for n in names)
    capped = peers.row_names(_args(tardis_resident=[1.0]))  # a resident-capped row per quantized tardis row
    assert set(capped) - set(names) == {"tardis-0.3-int8-r1", "tardis-0.5-int8-r1"}


def test_summary_ratios_and_table_with_a_skipped_row():
    args = _args()
    rows = []
    for name, family, seconds, nll in (("dense", "dense", [0.4, 0.5], 300.0),
                                       ("torchao-int8", "torchao", [0.2], 301.0)):
        row = peers.Row(name, {"dtype": "bf16"})
        row.family, row.resident_bytes = family, 269_000_000
        samples = [{"round": 0, "prompt": 0, "seconds": s} for s in seconds]
        rows.append(peers.summarize(row, samples, {"ppl": math.exp(nll / 100), "nll": nll,
                                                   "tokens": 100}, {"dense": [[1, 2, 3]], "torchao-int8": [[1, 2, 4]]},
                                    args))
    skipped = peers.Row("torchao-int4")
    skipped.family, skipped.skipped = "torchao", "does not run here: NotImplementedError | no kernel"
    rows.append(peers.summarize(skipped, [], None, {}, args))
    peers.add_ratios(rows)
    dense, int8, int4 = rows
    assert dense["tokens_per_s"] == pytest.approx(8 / 0.45) and dense["tokens_per_s_min"] == pytest.approx(16)
    assert int8["vs_dense"] == pytest.approx(40 / (8 / 0.45)) and int8["vs_torchao_int8"] == 1.0
    assert int8["ppl_delta_vs_dense"] == pytest.approx(math.exp(0.01) - 1)
    assert int8["prefix_agreement_with_dense"] == pytest.approx(2 / 3)
    assert int4["status"] == "skipped" and "tokens_per_s" not in int4
    result = {"args": vars(args), "cpu_model": "test CPU", "cpu_isa": ["avx2"], "l3_cache": "32768K",
              "rounds": [{"load_before": (0.1, 0, 0), "load_after": (0.2, 0, 0), "outside_share": 0.01,
                          "steal_share": 0.0}], "loaded": False, "rows": rows}
    table = peers.markdown(result)
    assert "| torchao-int8 | 40.0 [40.0-40.0] | 2.25 | 1.00 | " in table
    assert "skipped: does not run here: NotImplementedError / no kernel" in table  # no stray column
    assert len({line.count("|") for line in table.splitlines() if line.startswith("|")}) == 1


def test_weight_bytes_counts_tied_weights_once():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = torch.nn.Sequential(emb, head).to(torch.bfloat16)
    assert common.weight_bytes(model) == 10 * 4 * 2


def test_weight_bytes_of_torchao_int8():
    pytest.importorskip("torchao", reason="torchao is in the bench extra (pip install tardis-compiler[bench])")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False)).to(torch.bfloat16)
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False))
    # int8 weights plus one bf16 scale per output row (and whatever small metadata torchao keeps)
    assert 64 * 32 <= common.weight_bytes(model) < 64 * 32 * 2


def test_outside_load_meter():
    with common.OutsideLoad() as load:
        sum(range(100_000))
    record = load.record()
    assert 0.0 <= record["outside_share"] <= 1.0 and len(record["load_before"]) == 3


def test_rows_of_missing_peers_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if not installed: import raises ImportError
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    model = torch.nn.Linear(4, 4)
    rows = peers.build_torch_rows(["torchao-int8", "torchao-int4"], model, None, _args(int4_group_size=32), None)
    rows += peers.build_llama_rows(["llama.cpp-Q8_0-1t"], model, _args(), 512, "test")[0]
    assert [(r.name, r.family) for r in rows] == [("torchao-int8", "torchao"), ("torchao-int4", "torchao"),
                                                 ("llama.cpp-Q8_0-1t", "llama.cpp")]
    assert all(r.skipped and "not installed" in r.skipped for r in rows)
    assert peers.live(rows) == []
