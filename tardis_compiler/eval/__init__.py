"""Evaluation harness: what compression costs, measured side by side with the dense model and
the pruning baselines at the same FFN weight bytes read per token.

Quick start (see docs/eval.md)::

    from tardis_compiler.eval import EvalConfig, run_eval, save_outputs
    config = EvalConfig.from_preset("quick", model="smollm2")
    results = run_eval(config)
    save_outputs(results, output_dir=config.output_dir, results_md=None)

Command line: ``tardis eval --model smollm2 --quick``.
"""
from ..accounting import bitmask_bytes, density_for_budget
from .accounting import FFNBytes, PreparedModel, ReadMeter
from .activation_sparsity import teal
from .calibration_stats import ffn_input_stats
from .config import PRESETS, EvalConfig
from .corpus import (CorpusSplit, calibration_batches, evaluation_passages, evaluation_windows,
                     special_tokens, split_articles, wikipedia_split)
from .errors import ContextTooLong, DatasetTooSmall, InvalidBudget, ModelPackageMissing
from .ffn import FFN_LINEAR_PATTERNS, dense_ffn_bytes, find_ffn_linears
from .harness import run_eval
from .methods import dense, get_method, method_names, register_method, unregister_method
from .metrics import (embedding_cosine, evaluate_task, perplexity, score_continuations,
                      sentence_embeddings)
from .models import MODELS, cache_dir, load_model
from .packages import OFFLINE_PACKAGES, install_command, package_dir
from .pruning import ria, wanda
from .report import markdown_table, save_outputs
from .tasks import TASKS, load_task
from .wiki import read_articles, strip_wiki_markup

__all__ = [
    "FFNBytes", "PreparedModel", "ReadMeter", "bitmask_bytes", "density_for_budget", "teal",
    "ffn_input_stats", "PRESETS", "EvalConfig", "CorpusSplit", "calibration_batches",
    "evaluation_passages", "evaluation_windows", "special_tokens", "split_articles",
    "wikipedia_split", "ContextTooLong", "DatasetTooSmall", "InvalidBudget", "ModelPackageMissing",
    "FFN_LINEAR_PATTERNS", "dense_ffn_bytes", "find_ffn_linears", "run_eval", "dense",
    "get_method", "method_names", "register_method", "unregister_method", "embedding_cosine",
    "evaluate_task", "perplexity", "score_continuations", "sentence_embeddings", "MODELS",
    "cache_dir", "load_model", "OFFLINE_PACKAGES", "install_command", "package_dir", "ria",
    "wanda", "markdown_table", "save_outputs", "TASKS", "load_task", "read_articles",
    "strip_wiki_markup",
]
