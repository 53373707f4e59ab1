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
    model = None
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name") and model is None:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    isa = [name for name in ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16", "avx2",
                             "avx_vnni") if name in flags]
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "cpu_model": model, "l3_cache": _l3_size(),
            "cpu_isa": isa, "torch_isa": os.environ.get("ATEN_CPU_CAPABILITY", "native"),
            "load_average": os.getloadavg(), "threads": torch.get_num_threads(), "kernel": status()}


def _l3_size() -> str | None:
    """The last-level cache's size as the kernel reports it (e.g. "32768K"), or None."""
    import glob

    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(f"{index}/level") as f:
                if f.read().strip() != "3":
                    continue
            with open(f"{index}/size") as f:
                return f.read().strip()
        except OSError:
            continue
    return None


class OutsideLoad:
    """CPU time the rest of the machine (not this process or its children) used while a ``with``
    block ran, as a share of all cores' wall time (0: quiet; 0.5 on 2 cores: one core busy), and
    the load averages before and after. The load average counts this benchmark's own threads;
    ``share`` does not.

        >>> with OutsideLoad() as load:
        ...     pass
        >>> sorted(load.record())
        ['load_after', 'load_before', 'outside_share', 'steal_share']
    """

    def __enter__(self) -> "OutsideLoad":
        self.load_before = os.getloadavg()
        self._start = (time.perf_counter(), *_busy_jiffies(), _own_jiffies())
        return self

    def __exit__(self, *exc) -> None:
        wall0, busy0, steal0, own0 = self._start
        wall, busy, steal, own = time.perf_counter() - wall0, *_busy_jiffies(), _own_jiffies()
        self.load_after = os.getloadavg()
        total = max(wall * (os.cpu_count() or 1) * os.sysconf("SC_CLK_TCK"), 1e-9)
        # Jiffies tick every 10 ms: a block that short reads 0 or 1 core at random; clamp to [0, 1].
        self.share = min(1.0, max(0.0, (busy - busy0) - (own - own0)) / total)
        self.steal = min(1.0, max(0.0, steal - steal0) / total)

    def record(self) -> dict:
        return {"load_before": self.load_before, "load_after": self.load_after,
                "outside_share": round(self.share, 4), "steal_share": round(self.steal, 4)}


def _busy_jiffies() -> tuple[int, int]:
    """All cores' busy jiffies (user, nice, system, irq, softirq; not idle, iowait or steal) and steal."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def _own_jiffies() -> int:
    """This process's CPU jiffies (all threads) plus its waited-for children's and those of live
    children (e.g. a worker process)."""
    def stat(pid) -> list[str]:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()

    fields = stat("self")
    total = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or pid == me:
            continue
        try:
            child = stat(pid)
        except OSError:
            continue
        if child[1] == me:  # ppid
            total += int(child[11]) + int(child[12])
    return total


def compile_forward(model, **kwargs):
    """``torch.compile(model.forward)`` in its own recompile region: a benchmark compiles one
    forward a dozen times (one per variant), past dynamo's shared per-code limit of 8."""
    return torch.compile(model.forward, dynamic=True, isolate_recompiles=True, **kwargs)


def allow_many_compiles(limit: int = 256) -> None:
    """Raise dynamo's per-code recompile limit (several models compile the same forward code) and
    make hitting it an error rather than a silent fall back to eager (which would time eager)."""
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers ``model`` holds, tied ones once; tensor subclasses
    (torchao's quantized weights) are counted by their inner tensors."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += _tensor_bytes(t)
    return total


def _tensor_bytes(t: torch.Tensor) -> int:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
        names, _ = inner()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


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
    """A hash of the calibration package's source, the quantized reference's and the bytes model's:
    profiles cached by an older fit are not reused."""
    import hashlib
    import importlib

    # importlib: ``tardis_compiler.calibrate`` the attribute is the function, the package is this.
    folder = os.path.dirname(importlib.import_module("tardis_compiler.calibrate").__file__)
    paths = [os.path.join(folder, name) for name in sorted(os.listdir(folder)) if name.endswith(".py")]
    # what a quantized pack's reference is (calibration fits against it) and how bytes are priced
    package = os.path.dirname(folder)
    paths += [os.path.join(package, "runtime", "quantize.py"), os.path.join(package, "accounting.py")]
    digest = hashlib.sha1()
    for path in paths:
        with open(path, "rb") as f:
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
