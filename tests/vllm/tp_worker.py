"""Greedy tokens of a checkpoint served by vLLM at a tensor-parallel size, in a process of its own
(tensor parallelism starts one worker process per rank: the in-process engine of the tier cannot).

    python -m tests.vllm.tp_worker FOLDER TP      # one JSON line: tokens per prompt, what each rank holds
"""
from __future__ import annotations

import json
import sys

from tests.vllm.helpers import PROMPTS


def held(model) -> list[tuple[int, int]]:
    """Per rank: each TardisMLP's bundled neurons and bytes held."""
    from tardis_compiler.vllm.mlp import TardisMLP

    return [(m.layout.k_bundles, m.resident_bytes()) for m in model.modules() if isinstance(m, TardisMLP)]

if __name__ == "__main__":
    from vllm import LLM

    from tests.vllm.helpers import vllm_tokens

    folder, tp = sys.argv[1], int(sys.argv[2])
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, tensor_parallel_size=tp, seed=0,
              skip_tokenizer_init=True, max_model_len=128, distributed_executor_backend="mp" if tp > 1 else "uni")
    tokens = vllm_tokens(llm, PROMPTS, 16)
    from tests.vllm.tp_worker import held as importable  # pickled by name: not __main__'s copy
    print(json.dumps({"tokens": tokens, "held": llm.apply_model(importable)}), flush=True)
