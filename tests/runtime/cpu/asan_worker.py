"""Run under AddressSanitizer (``test_asan.py`` starts it with libasan preloaded): build the kernel
with ``-fsanitize=address``, then (1) the op's seeded fuzz, kernel against the torch path; (2) the
kernel's entry points called directly with corrupt metas, short and mistyped buffers, wrong token
counts and activations, bypassing every Python check but the kernel's own; (3) the hostile
checkpoints listed in argv[1], if given. Any out-of-bounds access aborts the process with ASan's
report; a clean run prints "ASAN OK".
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tardis_compiler.runtime.cpu import build, kernel as kernel_module

build.FLAGS = (*build.FLAGS, "-fsanitize=address", "-fno-omit-frame-pointer")
kernel_module.reset()

from tardis_compiler.runtime.layout import FIELD, KERNEL_ACTIVATIONS, META_FIELDS  # noqa: E402
from tardis_compiler.runtime.torch_path import ffn_torch  # noqa: E402
from tests.runtime.pack_cases import Case, make  # noqa: E402
from tests.runtime.test_ffn_op import WIDE_CASES, _random_cases, check_exact_all  # noqa: E402

BAD_VALUES = (0, -1, 1, 63, 64, 65, 2 ** 20 + 1, 2 ** 31, 2 ** 62, -(2 ** 62))


def fuzz(k, n: int) -> None:
    for case, tokens, threads in _random_cases(n, seed=0):
        _, _, x, pack = make(case, tokens)
        expected, _ = ffn_torch(x, *pack.tensors(), pack.layout)
        y = torch.empty_like(expected)
        torch.set_num_threads(threads)
        k.ffn(x, y, *pack.tensors(), KERNEL_ACTIVATIONS[pack.activation])
        scale = max(1.0, expected.float().abs().max().item())
        tol = 1e-4 if case.dtype == torch.float32 else 3e-2
        torch.testing.assert_close(y.float() / scale, expected.float() / scale, atol=tol, rtol=tol)
    for i, case in enumerate(WIDE_CASES + [c for c, _, _ in _random_cases(n, seed=5)][:20]):  # exact_all mode
        check_exact_all(k, case, 13 if i % 2 else 64, threads=1 + i % 2)
    torch.set_num_threads(2)


def refused_or_ran(call) -> str:
    try:
        call()
    except ValueError:
        return "refused"
    return "ran"


def abuse(k) -> dict:
    """Every meta field at every bad value, buffers short by one element or of another dtype, x and
    y of the wrong size, another activation: each call is refused or (if still a valid pack) runs."""
    counts = {"refused": 0, "ran": 0}
    for kind in ("plain", "gated"):
        for guard, bundles, quantized in (("int8", "int8", "dense"), ("int4", "dense", "dense"),
                                          ("int2", "int8", "dense"), ("svd", "int8", "dense"), ("exact", "dense", "dense"),
                                          ("all", "dense", "dense"), ("int4", "int8", "int8"), ("int8", "int8", "int4")):
            for dtype in (torch.float32, torch.bfloat16):
                case = Case(kind, 33, 17, 45, guard=guard, dtype=dtype, bundles=bundles, group=16, rank=3,
                            weights_encoding=quantized)
                _, _, x, pack = make(case, 2)
                act = KERNEL_ACTIVATIONS[pack.activation]
                weights, guard_bytes, floats, meta = pack.tensors()
                y = torch.empty(2, 17, dtype=dtype)
                calls = []
                for field in range(len(META_FIELDS)):
                    for value in (*BAD_VALUES, int(meta[field]) + 1, int(meta[field]) - 1):
                        bad = meta.clone()
                        bad[field] = value
                        calls.append(lambda b=bad: k.ffn(x, y, weights, guard_bytes, floats, b, act))
                        if pack.layout.guard in ("int8", "int4", "int2"):
                            calls.append(lambda b=bad: k.guard_predict(x, weights, guard_bytes, floats, b,
                                                                       pack.layout.k_guard))
                short = [t[:-1] if t.numel() else t for t in (weights, guard_bytes, floats)]
                for i in range(3):
                    bufs = [weights, guard_bytes, floats]
                    bufs[i] = short[i]
                    calls.append(lambda b=bufs: k.ffn(x, y, *b, meta, act))
                for other in (torch.float32, torch.bfloat16, torch.int8, torch.uint8, torch.float64):
                    calls.append(lambda o=other: k.ffn(x.to(o), y, weights, guard_bytes, floats, meta, act))
                    calls.append(lambda o=other: k.ffn(x, y.to(o), weights, guard_bytes, floats, meta, act))
                    calls.append(lambda o=other: k.ffn(x, y, weights.to(o), guard_bytes, floats, meta, act))
                    calls.append(lambda o=other: k.ffn(x, y, weights, guard_bytes.to(o), floats, meta, act))
                    calls.append(lambda o=other: k.ffn(x, y, weights, guard_bytes, floats.to(o), meta, act))
                    calls.append(lambda o=other: k.ffn(x, y, weights, guard_bytes, floats, meta.to(o), act))
                calls += [lambda: k.ffn(x[:, :-1].contiguous(), y, weights, guard_bytes, floats, meta, act),
                          lambda: k.ffn(x, y[:1], weights, guard_bytes, floats, meta, act),
                          lambda: k.ffn(x, torch.empty(2, 16, dtype=dtype), weights, guard_bytes, floats, meta, act),
                          lambda: k.ffn(x, y, weights, guard_bytes, floats, meta[:-1], act),
                          lambda: k.ffn(x, y, weights, guard_bytes, floats, meta, (act + 1) % 5),
                          lambda: k.ffn(x, y, weights, guard_bytes, floats, meta, 99),
                          lambda: k.ffn(torch.randn(65, 33).to(dtype), torch.empty(65, 17, dtype=dtype), weights,
                                        guard_bytes, floats, meta, act)]
                for call in calls:
                    counts[refused_or_ran(call)] += 1
                assert meta[FIELD["MAGIC"]] != 0
    return counts


if __name__ == "__main__":
    k = kernel_module.kernel()
    assert k is not None, kernel_module.status()
    assert "-fsanitize=address" in build.FLAGS
    fuzz(k, 60)
    counts = abuse(k)
    print("abuse", json.dumps(counts), flush=True)
    if len(sys.argv) > 1:
        from tests.hf.hostile import run_cases

        run_cases(json.loads(Path(sys.argv[1]).read_text()))
    print("ASAN OK", flush=True)
