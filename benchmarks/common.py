"""What the speed benchmarks share: interleaved median timing, cached calibrations of the real
models, and the machine's description."""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Callable

import torch

import tardis_compiler as tc

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int, inner: int = 1) -> dict[str, float]:
    """Median seconds of one ``inner``-fold run of each variant; the variants take turns within
    each repeat, so drift and noise on a shared machine hit them alike."""
    for fn in variants.values():  # warm up (and compile)
        fn()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            samples[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(v) for name, v in samples.items()}


def machine() -> dict:
    """Where and when a measurement was made."""
    from tardis_compiler.runtime.cpu.kernel import status

    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "threads": torch.get_num_threads(), "kernel": status()}


def write_json(name: str, data: dict) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path


def profile_cache_dir() -> str:
    root = os.environ.get("TARDIS_CACHE_DIR") or os.path.expanduser("~/.cache/tardis_compiler")
    return os.path.join(root, "bench_profiles")


def cached_profiles(name: str, model: torch.nn.Module, batches, budgets, config: tc.CalibrationConfig,
                    guard: str | None = None) -> dict[float, tc.Profile]:
    """Budget-fitted profiles of ``model`` (one recording, one fit per budget), saved under
    ``profile_cache_dir()/name-guard-budget-<config hash>`` and loaded from there on later runs
    (the hash of the config and package version: a changed calibration is fitted afresh)."""
    import hashlib

    key = json.dumps({"config": config.to_dict(), "version": tc.__version__, "fit": _calibration_source_hash()},
                     sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    out, recorder = {}, None
    for budget in budgets:
        path = os.path.join(profile_cache_dir(), f"{name}-{guard or 'default'}-{budget}-{digest}")
        if os.path.isdir(path):
            out[budget] = tc.Profile.load(path)
            continue
        if recorder is None:
            recorder = tc.record(model, batches, config)
        out[budget] = tc.calibrate_for_budget(model, batches, budget, guard, config, recorder=recorder)
        out[budget].save(path)
    return out


def _calibration_source_hash() -> str:
    """A hash of the calibration package's source: profiles cached by an older fit are not reused."""
    import hashlib
    import importlib

    # importlib: ``tardis_compiler.calibrate`` the attribute is the function, the package is this.
    folder = os.path.dirname(importlib.import_module("tardis_compiler.calibrate").__file__)
    digest = hashlib.sha1()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


@dataclasses.dataclass
class Bandwidth:
    """The read limit measured by bandwidth.py, if it was run."""

    read_gbps: float | None

    @classmethod
    def load(cls) -> "Bandwidth":
        path = os.path.join(RESULTS, "bandwidth.json")
        if not os.path.isfile(path):
            return cls(None)
        with open(path) as f:
            rows = json.load(f)["rows"]
        threads = torch.get_num_threads()
        row = next((r for r in rows if r["threads"] == threads), rows[-1])
        return cls(row["read_GBps"])
