"""A hostile checkpoint (tests/hf/hostile.py's mutations of a tiny compressed Llama) gets the same
verdict at the vLLM door as at the transformers door: refused with the same error message, or, where
transformers loads it (a format-2 checkpoint's valid-looking random bytes), served. Cases run in a
worker process, so a crash names its case. CI runs a seeded sample; ``-m slow`` runs them all."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hf.hostile import cases, write_case
from tests.vllm.helpers import save_tiny

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[2]
CI_SAMPLE = 16


def run(tmp: Path, sample: int | None) -> tuple[list[dict], list[str]]:
    source = save_tiny("llama", tmp / "pristine")
    chosen = [("pristine", lambda folder: None), *cases(source, seed=0)]
    if sample is not None:
        chosen = chosen[:1] + random.Random("vllm-hostile").sample(chosen[1:], sample)
    listed = []
    for i, (name, mutate) in enumerate(chosen):
        write_case(source, tmp / f"case{i}", mutate)
        listed.append((name, str(tmp / f"case{i}")))
    results, todo = [], listed
    while todo:
        (tmp / "listing.json").write_text(json.dumps({"cases": todo}))
        proc = subprocess.run([sys.executable, "-m", "tests.vllm.hostile_worker", str(tmp / "listing.json")],
                              cwd=ROOT, capture_output=True, text=True, timeout=1800)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        results += lines
        todo = todo[len(lines):]
        if proc.returncode != 0:
            assert todo, f"worker failed after the last case (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
            results.append({"case": todo[0][0], "crash": proc.stderr[-3000:]})
            todo = todo[1:]
    return results, [name for name, _ in listed]


def _claim(message: str) -> str:
    """A refusal's message without the door's own parameter list (vLLM's MLP merges gate and up)."""
    return message.split("; this model's parameters:")[0]


def disagreements(results: list[dict]) -> list[dict]:
    """Cases whose verdicts differ: a crash, a refusal at one door only, refusals with different messages,
    or a served checkpoint whose text is not the pristine one's (unless transformers' logits changed too)."""
    pristine = results[0]
    assert pristine["case"] == "pristine" and pristine["vllm"]["outcome"] == "ran", pristine
    bad = []
    for r in results[1:]:
        if "crash" in r:
            bad.append(r)
            continue
        hf, vl = r["hf"], r["vllm"]
        if hf["outcome"] == "error":
            if vl["outcome"] != "error" or _claim(hf["message"]) not in vl["message"]:
                bad.append(r)
        elif vl["outcome"] != "ran":
            bad.append(r)
        elif hf["digest"] == pristine["hf"]["digest"] and vl["tokens"] != pristine["vllm"]["tokens"]:
            bad.append(r)
    return bad


def test_hostile_checkpoints_get_the_transformers_verdict(tmp_path):
    results, names = run(tmp_path, CI_SAMPLE)
    assert [r["case"] for r in results] == names
    assert not disagreements(results), json.dumps(disagreements(results), indent=1)[:6000]
    assert sum(r["hf"]["outcome"] == "error" for r in results[1:] if "hf" in r) >= CI_SAMPLE // 2


@pytest.mark.slow
def test_every_hostile_checkpoint_gets_the_transformers_verdict(tmp_path):
    results, names = run(tmp_path, None)
    assert [r["case"] for r in results] == names
    assert not disagreements(results), json.dumps(disagreements(results), indent=1)[:6000]
