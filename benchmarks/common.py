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


#: Instruction sets a benchmark can run as if the CPU had no more (``--isa``): the environment that
#: pins torch's kernels (ATen, inductor's generated C++, oneDNN, MKL) to it, and the -march the
#: tardis kernel is built for. "avx2" is a CPU without AVX-512 (AMD Zen 2/3, Intel client cores).
ISAS = {"avx2": ({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
                 "x86-64-v3")}


def pin_isa(isa: str | None, kernel_march: str | None = None) -> None:
    """Run the rest of this process as on a CPU with only ``isa`` (see ``ISAS``): re-executes the
    script with the environment torch reads at start-up, then builds the tardis kernel for that
    -march (or ``kernel_march``: e.g. x86-64-v2 for the kernel's portable loops). None: the
    machine's own instruction sets."""
    if isa is None:
        return
    import sys

    from tardis_compiler.runtime.cpu import build, kernel

    env, march = ISAS[isa]
    march = kernel_march or march
    if any(os.environ.get(k) != v for k, v in env.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **env})
    build.FLAGS = tuple(f"-march={march}" if f == "-march=native" else f for f in build.FLAGS)
    kernel.reset()


def machine() -> dict:
    """Where and when a measurement was made (and the load average: a loaded machine ruins
    2-thread timings)."""
    from tardis_compiler.runtime.cpu.kernel import status

    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = [name for name in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "avx2", "avx_vnni") if name in flags]
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "cpu_isa": isa, "torch_isa": os.environ.get("ATEN_CPU_CAPABILITY", "native"),
            "load_average": os.getloadavg(), "threads": torch.get_num_threads(), "kernel": status()}


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
