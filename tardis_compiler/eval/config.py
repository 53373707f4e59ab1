"""``EvalConfig``: one validated description of an evaluation run, with named size presets.

Presets trade coverage for time (measured on a 2-core CPU with SmolLM2-135M):
"quick" takes minutes (SmolLM2, every method: 14.4 min measured), "standard" about an hour and a
half (64.9 min measured without tardis rows; dense + tardis alone 19.9 min), "full" uses every
window and every task item (hours on a CPU). Every size can be overridden.
"""
from __future__ import annotations

import dataclasses
import os
import difflib
from typing import Any, Mapping

from .errors import check_budget
from .tasks import TASKS

#: Zero-shot scorers: lm-evaluation-harness (the numbers papers report), or the project's own
#: batched scorer (about twice as fast; its agreement with lm-eval is tested item by item).
SCORERS = ("lm-eval", "fast")

#: Sizes per preset. ``None`` means "all of it". The standard preset's 500 items per task (ARC-Easy
#: has 570) put a 3-point difference in mean accuracy outside the noise: see docs/eval.md.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"calibration_batches": 8, "ppl_windows": 12, "task_limit": 25, "passages": 128},
    "standard": {"calibration_batches": 32, "ppl_windows": 64, "task_limit": 500, "passages": 1024},
    "full": {"calibration_batches": 64, "ppl_windows": None, "task_limit": None, "passages": None},
}


@dataclasses.dataclass
class EvalConfig:
    """What to evaluate, on how much data, and where the results go.

    Args:
        model: "smollm2" (decoder: perplexity + zero-shot), "minilm" (encoder: embedding cosine), or the
            path of a local causal LM or encoder: a Hugging Face folder, a tardis checkpoint, a .gguf file.
        methods: registered method names; None runs every registered method.
        budgets: FFN weight bytes read per token, as fractions of the dense model's, in (0, 1].
        context_length: tokens per window; None uses the model's default (512 / 256).
        calibration_batches: calibration windows of ``context_length`` tokens.
        ppl_windows: perplexity windows (None: all of the evaluation text).
        tasks: zero-shot tasks for decoders (see ``tasks.TASKS``).
        task_limit: items per task, a seeded subset (None: all).
        scorer: "lm-eval" (lm-evaluation-harness's tasks and HF wrapper) or "fast" (see ``SCORERS``).
        passages: evaluation paragraphs for encoder embedding cosine (None: all).
        seed: seeds the article split and every subset.
        preset: name recorded with the results (set by ``from_preset``).
        output_dir: where the results JSON and the plot go.
        results_md: markdown file whose "## Evaluation harness" section gets the table (None: skip;
            the CLI defaults to ``RESULTS.md`` in the output directory).
        plot: write the Pareto plot PNG.
        threads: ``torch.set_num_threads`` (None: leave torch's default).
        progress: show progress bars.

    Example:
        >>> EvalConfig.from_preset("quick", model="minilm").passages
        128
        >>> EvalConfig(budgets=(1.5,))
        Traceback (most recent call last):
        ...
        tardis_compiler.accounting.InvalidBudget: budget must be in (0, 1] ...
    """

    model: str = "smollm2"
    methods: tuple[str, ...] | None = None
    budgets: tuple[float, ...] = (0.3, 0.5, 0.7)
    context_length: int | None = None
    calibration_batches: int = PRESETS["standard"]["calibration_batches"]
    ppl_windows: int | None = PRESETS["standard"]["ppl_windows"]
    tasks: tuple[str, ...] = ("piqa", "hellaswag", "arc_easy", "lambada")
    task_limit: int | None = PRESETS["standard"]["task_limit"]
    scorer: str = "lm-eval"
    passages: int | None = PRESETS["standard"]["passages"]
    seed: int = 0
    preset: str = "standard"
    output_dir: str = "benchmarks/results"
    results_md: str | None = None
    plot: bool = True
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        from .models import MODELS  # models imports torch/transformers lazily; keep config light

        _check(self.model in MODELS or os.path.exists(os.path.expanduser(self.model)),
               f"model {self.model!r} is neither a built-in ({sorted(MODELS)}) nor a local path: give a Hugging "
               "Face model folder (with config.json and the tokenizer), a compressed checkpoint or a .gguf file")
        self.budgets = tuple(sorted({check_budget(b) for b in self.budgets}))
        _check(len(self.budgets) > 0, "give at least one budget")
        if self.methods is not None:
            self.methods = tuple(self.methods)
            _check(len(self.methods) > 0, "give at least one method (or None for all)")
        self.tasks = tuple(self.tasks)
        for task in self.tasks:
            _check(task in TASKS, f"unknown task {task!r}; known: {sorted(TASKS)}")
        _check(self.scorer in SCORERS, f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        _check(self.context_length is None or self.context_length >= 16,
               f"context_length must be >= 16 tokens, got {self.context_length}")
        _check(self.calibration_batches >= 1,
               f"calibration_batches must be >= 1, got {self.calibration_batches}")
        for name in ("ppl_windows", "task_limit", "passages"):
            value = getattr(self, name)
            _check(value is None or value >= 1, f"{name} must be >= 1 or None (all), got {value}")
        _check(self.threads is None or self.threads >= 1,
               f"threads must be >= 1, got {self.threads}")
        _check(self.preset in PRESETS or self.preset == "custom",
               f"preset must be one of {sorted(PRESETS)} or 'custom', got {self.preset!r}")

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> "EvalConfig":
        """A config with ``preset``'s sizes; keyword arguments override any field.

        Example:
            >>> EvalConfig.from_preset("full").ppl_windows is None
            True
        """
        _check(preset in PRESETS, f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[preset], "preset": preset, **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (recorded in the results JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvalConfig":
        """Inverse of ``to_dict``; an unknown key is an error with a did-you-mean hint.

        Example:
            >>> EvalConfig.from_dict(EvalConfig().to_dict()) == EvalConfig()
            True
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in fields:
                hint = difflib.get_close_matches(key, fields, n=1)
                raise ValueError(f"unknown eval config key {key!r}."
                                 + (f" Did you mean {hint[0]!r}?" if hint else "")
                                 + f" Valid: {sorted(fields)}")
        return cls(**data)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
