"""Hugging Face integration: the ``"tardis"`` quantizer behind ``save_pretrained`` / ``from_pretrained``
of ``compress_``ed models (``quantizer.py``)."""
from .quantizer import QUANT_METHOD, TardisConfig, TardisHfQuantizer, attach_quantization_config, register

__all__ = ["QUANT_METHOD", "TardisConfig", "TardisHfQuantizer", "attach_quantization_config", "register"]
