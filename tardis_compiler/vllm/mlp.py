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
from ..runtime.module import TardisFFN
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
        for name, tensor in weights:
            if name in PACK_TENSORS:
                self._buffers[name] = tensor.detach()
            elif tensor.numel() != 0:  # only the empty dense_key mark may sit beside the pack
                raise PackError(f"{where}: unexpected tensor {name!r} {list(tensor.shape)} in the checkpoint")
            loaded.add(name)
        return loaded
