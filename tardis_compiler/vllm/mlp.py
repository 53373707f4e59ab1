"""``TardisMLP``: a compressed MLP inside a vLLM model (a ``TardisFFN`` that vLLM's loader can fill).

vLLM's ``AutoWeightsLoader`` hands a module that has ``load_weights`` its checkpoint tensors with
module-relative names (``weights``, ``guard``, ``floats``, ``meta``, ``neurons``, and the empty
``dense_key`` mark, which vLLM's name mapper may have renamed, e.g. ``gate_proj`` ->
``gate_up_proj``). The tensors are only taken here; the checks run once all are loaded
(``checkpoint_modules.finish_module``, the transformers door's). Before that, the checkpoint's
stored headers were checked against the layout (``plan_modules``), so nothing else is stored
under the module.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..runtime.checkpoint_modules import ModulePlan
from ..runtime.ffn_op import runs_dense
from ..runtime.module import DENSE_MODULE, TardisFFN
from ..runtime.pack import FFNPack
from ..runtime.shard import shard_pack, wf_columns_output
from ..runtime.validate import PACK_TENSORS, PackError


class TardisMLP(TardisFFN):
    """The pack of one compressed MLP as buffers; ``forward`` is ``torch.ops.tardis.ffn``.

    Example:
        >>> from tardis_compiler.runtime.pack import build_pack, guard_all_params
        >>> w = {"w1_rows": torch.randn(16, 8), "b1": None, "w2_rows": torch.randn(16, 8), "b2": None}
        >>> pack = TardisFFN.from_pack("mlp", build_pack("plain", w, guard_all_params(16), "all", "relu", 64))
        >>> module = TardisMLP.empty(pack.spec(), device="meta")
        >>> sorted(module.load_weights((k, getattr(pack, k)) for k in ("weights", "guard", "floats", "meta", "neurons")))
        ['floats', 'guard', 'meta', 'neurons', 'weights']
        >>> torch.equal(module.weights, pack.weights)
        True
    """

    @classmethod
    def from_plan(cls, plan: ModulePlan) -> "TardisMLP":
        """The empty module (on the meta device) that a checked config.json entry describes."""
        module = cls.empty(plan.spec, device="meta")
        module.tardis_target = plan.target
        return module

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Take this module's checkpoint tensors (module-relative names); the names taken."""
        where = f"tardis module {getattr(self, 'tardis_target', self.name)}"
        loaded = set()
        kept = self._modules.get(DENSE_MODULE)
        for name, tensor in weights:
            if name in PACK_TENSORS:
                self._buffers[name] = tensor.detach()
            elif kept is not None and name.startswith(f"{DENSE_MODULE}.") and name[len(DENSE_MODULE) + 1:] in kept._buffers:
                kept._buffers[name[len(DENSE_MODULE) + 1:]] = tensor.detach()  # keep_dense: the FFN's own linears
            elif tensor.numel() != 0:  # only the empty dense_key mark may sit beside the pack
                raise PackError(f"{where}: unexpected tensor {name!r} {list(tensor.shape)} in the checkpoint")
            loaded.add(name)
        return loaded

    def shard(self, rank: int, world: int) -> None:
        """Keep only this tensor-parallel rank's part (``runtime/shard.py``), once the whole pack is
        loaded and checked: its neurons, its columns of Wf (the bias on rank 0), and with
        ``keep_dense`` its share of the FFN's own neurons; ``forward`` then all-reduces."""
        self.tp_rank, self.tp_world = rank, world
        if world == 1:
            return
        pack = FFNPack(self.weights, self.guard, self.floats, self.meta, self.layout.activation, self.neurons,
                       self.layout)
        part = shard_pack(pack, rank, world)
        for key, tensor in zip(PACK_TENSORS, (*part.pack.tensors(), part.pack.neurons)):
            self._buffers[key] = tensor
        self.layout, self.tp_cols = part.pack.layout, part.cols
        self.register_buffer("tp_wf", part.wf)  # None without a Wf
        self.register_buffer("tp_wf_scales", part.wf_scales)
        kept = self._modules.get(DENSE_MODULE)
        if kept is not None:  # the dense path splits the same way: input linears by rows, the output one by columns
            m = self.layout.m
            rows = slice(m * rank // world, m * (rank + 1) // world)
            last = len(self.dense_biases) - 1
            for i in range(last + 1):
                w = kept._buffers[f"w{i}"]
                kept._buffers[f"w{i}"] = (w[rows] if i < last else w[:, rows]).contiguous()
                if self.dense_biases[i] and i < last:
                    kept._buffers[f"b{i}"] = kept._buffers[f"b{i}"][rows].contiguous()
                elif self.dense_biases[i] and rank:
                    kept._buffers[f"b{i}"] = torch.zeros_like(kept._buffers[f"b{i}"])  # the output bias once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if getattr(self, "tp_world", 1) == 1:
            return y
        from vllm.distributed import tensor_model_parallel_all_reduce

        ran_dense = self.dense_biases is not None and runs_dense(x.numel() // x.shape[-1], self.dense_threshold())
        if self.tp_wf is not None and not ran_dense:  # the pack ran (guarded, or every bundle exact)
            y = y + wf_columns_output(x, self.tp_cols, self.tp_wf, self.tp_wf_scales)
        return tensor_model_parallel_all_reduce(y)
