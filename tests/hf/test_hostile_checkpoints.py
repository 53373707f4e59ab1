"""A checkpoint is untrusted input: every mutation of a saved tiny compressed model (plain and
gated, float32 and bfloat16) gives a clear error at load or first call, or the very same logits;
never a crash, never wrong outputs. Cases run in a worker process (tests/hf/hostile.py), so a
crash fails the test and names the case instead of killing pytest.

CI runs a seeded sample of the cases of each checkpoint; ``-m slow`` runs them all.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tardis_compiler as tc
from tests.hf.hostile import NO_DIGEST, cases, linear_cases, write_case
from tests.tiny_models import build_tiny, token_batches

ROOT = Path(__file__).resolve().parents[2]
#: (architecture, dtype, quantized packs): the last one's packs hold every weight int4 (their group
#: scales in the guard buffer, where only the pack validation's range check stands before the kernel).
CHECKPOINTS = [("llama", "float32", None), ("llama", "bfloat16", None), ("opt", "float32", None),
               ("opt", "bfloat16", None), ("llama", "bfloat16", "int4")]
CI_SAMPLE = 40  # cases per checkpoint in the fast tier (of about 330)
#: Errors a user can act on; each must also say "tardis" (which module or field).
CLEAR_ERRORS = {"ValueError", "PackError", "FileNotFoundError"}


def save_checkpoint(arch: str, dtype: str, folder: Path, other_linears: str | None = None,
                    weights: str | None = None) -> Path:
    """A tiny ``arch`` model in ``dtype``, calibrated and compressed (int8 guarded rows; with
    ``other_linears``, its other linears quantized; with ``weights``, quantized packs), saved."""
    model = build_tiny(arch, dtype=getattr(torch, dtype))
    batches = token_batches(4)
    profile = tc.calibrate(model, batches, tc.CalibrationConfig(progress=False, group_size=32, weights=weights))
    tc.compress_(model, profile, batches[0], other_linears=other_linears)
    model.save_pretrained(folder)
    return folder


def run_worker(listing: dict, folder: Path, env: dict | None = None, timeout: int = 900) -> list[dict]:
    """Every case's outcome; a case during which the worker died is reported as "crash" (with the
    worker's last output) and the rest run in a fresh worker."""
    results, todo = [], list(listing["cases"])
    while todo:
        path = folder / f"listing-{len(results)}.json"
        path.write_text(json.dumps({**listing, "cases": todo}))
        proc = subprocess.run([sys.executable, "-m", "tests.hf.hostile", str(path)], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout, env=env)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        results += lines
        todo = todo[len(lines):]
        if proc.returncode != 0:
            if not todo:  # died after the last case, or before the reference: report it
                raise AssertionError(f"worker failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            results.append({"case": todo[0][0], "outcome": "crash", "message": proc.stderr[-3000:]})
            todo = todo[1:]
    return results


def bad_outcomes(results: list[dict]) -> list[dict]:
    """The cases that crashed, changed the outputs, or failed without a clear tardis error. One
    exception, the limit of format-2 checkpoints (no sha256): random bytes that are still valid
    values (guard codes, weights) are a different model, not a detectable fault."""
    def fine(r: dict) -> bool:
        if r["outcome"] == "different":
            return r["case"].endswith(NO_DIGEST) and "random bytes" in r["case"]
        return r["outcome"] == "same" or (r["outcome"] == "error" and r["error"] in CLEAR_ERRORS
                                          and "tardis" in r["message"].lower())
    return [r for r in results if not fine(r)]


def hostile_run(arch: str, dtype: str, tmp: Path, sample: int | None, env: dict | None = None,
                weights: str | None = None) -> list[dict]:
    source = save_checkpoint(arch, dtype, tmp / "pristine", weights=weights)
    chosen = cases(source, seed=0)
    if sample is not None:
        chosen = random.Random(f"{arch}-{dtype}" + (f"-{weights}" if weights else "")).sample(
            chosen, min(sample, len(chosen)))
    listed = []
    for i, (name, mutate) in enumerate(chosen):
        write_case(source, tmp / f"case{i}", mutate)
        listed.append((name, str(tmp / f"case{i}")))
    return run_worker({"dtype": dtype, "pristine": str(source), "cases": listed}, tmp, env=env)


@pytest.mark.parametrize("arch,dtype,weights", CHECKPOINTS)
def test_hostile_checkpoints_sample(arch, dtype, weights, tmp_path):
    results = hostile_run(arch, dtype, tmp_path, CI_SAMPLE, weights=weights)
    assert len(results) == CI_SAMPLE
    assert not bad_outcomes(results), json.dumps(bad_outcomes(results), indent=1)[:6000]
    assert any(r["outcome"] == "error" for r in results)


@pytest.mark.slow
@pytest.mark.parametrize("arch,dtype,weights", CHECKPOINTS)
def test_hostile_checkpoints_all(arch, dtype, weights, tmp_path):
    results = hostile_run(arch, dtype, tmp_path, None, weights=weights)
    assert not bad_outcomes(results), json.dumps(bad_outcomes(results), indent=1)[:6000]


@pytest.mark.parametrize("arch,dtype,other", [("llama", "bfloat16", "int8"), ("opt", "float32", "int4")])
def test_hostile_quantized_linears(arch, dtype, other, tmp_path):
    """Every mutation of a quantized linear's tensors (wrong dtype or shape, missing, NaN / inf / zero /
    negative scales, random bytes) and of its config entry: a clear error or the same logits."""
    source = save_checkpoint(arch, dtype, tmp_path / "pristine", other_linears=other)
    listed = []
    for i, (name, mutate) in enumerate(linear_cases(source, seed=0)):
        write_case(source, tmp_path / f"case{i}", mutate)
        listed.append((name, str(tmp_path / f"case{i}")))
    results = run_worker({"dtype": dtype, "pristine": str(source), "cases": listed}, tmp_path)
    assert len(results) == len(listed)
    assert not bad_outcomes(results), json.dumps(bad_outcomes(results), indent=1)[:6000]
    assert sum(r["outcome"] == "error" for r in results) >= len(results) - 2


def test_an_untouched_checkpoint_loads_with_the_same_logits(tmp_path):
    """The control: the worker reports "same" for a plain copy (so "same" means what it says)."""
    source = save_checkpoint("llama", "bfloat16", tmp_path / "pristine")
    write_case(source, tmp_path / "copy", lambda folder: None)
    results = run_worker({"dtype": "bfloat16", "pristine": str(source), "cases": [("copy", str(tmp_path / "copy"))]},
                         tmp_path)
    assert [r["outcome"] for r in results] == ["same"]

