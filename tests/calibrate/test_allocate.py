"""allocate.py: one budget shared across FFNs (allocation="model")."""
import torch

import tardis_compiler as tc
from tardis_compiler.calibrate.allocate import fit_policy_ffns
from tests.calibrate.records import gated_record


def test_model_allocation_meets_the_budget_overall_and_moves_bytes_to_the_larger_error():
    easy, hard = gated_record(seed=1), gated_record(seed=2)
    easy.name, hard.name = "easy", "hard"
    with torch.no_grad():  # "hard": the same FFN with gates spread far wider, so folding costs more
        hard.weights["wg_rows"].mul_(3.0)
    cfg = tc.CalibrationConfig(budget=0.5, progress=False, allocation="model")
    ffns = fit_policy_ffns([easy, hard], cfg, {"gated": "int8"})
    spent = {n: f.stats["policy"]["calibration_bytes_fraction"] for n, f in ffns.items()}
    assert (spent["easy"] + spent["hard"]) / 2 <= 0.5 + 1e-6
    assert spent["hard"] > spent["easy"]
