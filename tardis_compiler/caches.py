"""The package's caches, and the one call that empties them all."""
from __future__ import annotations

from .backend import STATES
from .runtime.graph_packs import forget_fast_paths
from .runtime.pack_cache import PACK_CACHE


def clear_caches() -> None:
    """Forget every pack and auto-calibration state. Needed after weight edits that bypass
    ``_version`` (through ``.data``, or on tensors made under ``torch.inference_mode()``).

    Example:
        >>> import tardis_compiler
        >>> tardis_compiler.clear_caches()
    """
    PACK_CACHE.clear()
    STATES.clear()
    forget_fast_paths()
