"""PPL of SmolLM2 bf16 compressed at 0.3/0.5/0.7 (int8 rows) and 0.5 (dense rows): the same
calibration as benchmarks/checkpoint.py (16 windows, one recording), 8 held-out windows. No timing
(benchmarks/checkpoint.py times; this fills its PPL column). Writes results/checkpoint-ppl.json.

    python benchmarks/checkpoint_ppl.py
"""
import copy, json, sys, time, torch
import tardis_compiler as tc
from common import machine, write_json
from tardis_compiler.eval.models import load_model
from tardis_compiler.eval.corpus import calibration_batches, evaluation_windows, special_tokens
from tardis_compiler.eval.metrics import perplexity
torch.set_num_threads(2)
loaded = load_model("smollm2", dtype=torch.bfloat16)
dense, tok = loaded.model, loaded.tokenizer
batches = calibration_batches(tok, context_length=512, num_batches=16)
windows = evaluation_windows(tok, context_length=512, num_windows=8)
prefix = special_tokens(tok)[0]
rec = tc.record(dense, batches, tc.CalibrationConfig(progress=False))
out = {"dense": perplexity(dense, windows, prefix).value}
print(out, flush=True)
for budget, bundles in ((0.3, "int8"), (0.5, "int8"), (0.7, "int8"), (0.5, "dense")):
    profile = rec.fit("ppl check", tc.CalibrationConfig(progress=False, budget=budget, bundles=bundles))
    model = copy.deepcopy(dense)
    report = tc.compress_(model, profile, batches[0][:, :16])
    out[f"{budget} {bundles}"] = {"ppl": perplexity(model, windows, prefix).value, "held": report.resident_fraction(),
                                  "read": report.read_fraction()}
    print(budget, bundles, out[f"{budget} {bundles}"], flush=True)
    write_json("checkpoint-ppl.json", {**machine(), "rows": out})  # after every row: partial runs keep theirs
