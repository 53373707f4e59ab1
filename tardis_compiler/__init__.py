"""tardis_compiler: partial constant folding of transformer FFNs, as a torch.compile backend.

    model = torch.compile(model, backend="tardis", options={"profile": profile})

Pipeline: capture (backend) -> match (passes.find_ffns) -> calibrate (the calibrate package: record,
ranges, margins, lstsq_fold, plain/gated candidates, policy, allocate, coverage, drive) -> rewrite
(passes.fold_ffns; compress.compress_, the module swap) -> lower (runtime.ffn_op, runtime/cpu) -> inspect (explain). Bytes accounting:
accounting.
"""
from .activations import (ActivationRule, activation_rules, get_activation_rule,
                          register_activation_rule, unregister_activation_rule)
from .backend import TrainingModeError, tardis_backend
from .calibrate import calibrate, calibrate_for_budget, record
from .config import DEFAULT_BUDGET, GUARDS, CalibrationConfig
from .options import TardisOptions
from .explain import ExplainReport, explain
from .profile import FFNProfile, Profile, ProfileError, ProfileMismatchError
from .caches import clear_caches
from .compress import CompressReport, compress_
from .reference import quantized_reference
from .runtime.ffn_op import every_token_through_packs
from .runtime.stats import collect_stats

try:  # transformers' quantizer registry: checkpoints with quant_method "tardis" load (hf/quantizer.py)
    from .hf import TardisConfig, register as _register_with_transformers
except ImportError:  # a transformers without the quantizer plugin API
    TardisConfig = None
else:
    _register_with_transformers()

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BUDGET", "GUARDS", "ActivationRule", "CalibrationConfig", "CompressReport", "ExplainReport", "FFNProfile", "Profile",
    "ProfileError", "ProfileMismatchError", "TardisConfig", "TardisOptions", "TrainingModeError", "activation_rules", "calibrate",
    "calibrate_for_budget", "clear_caches", "compress_", "collect_stats", "every_token_through_packs", "explain", "get_activation_rule", "quantized_reference", "register_activation_rule",
    "tardis_backend", "unregister_activation_rule",
]
