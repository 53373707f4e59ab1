"""Errors the evaluation harness raises, each saying what to do about it.

They subclass the built-in error a caller would expect (``ImportError`` for a missing package,
``ValueError`` for bad input), so ``except ValueError`` keeps working.
"""
from __future__ import annotations

# A budget is a fraction of dense bytes: its error and its check live with the bytes accounting,
# which the harness's formulas (density_for_budget) share; re-exported as the harness's errors.
from ..accounting import InvalidBudget, check_budget

__all__ = ["ContextTooLong", "DatasetTooSmall", "InvalidBudget", "MethodNotApplicable", "ModelNotFound",
           "ModelPackageMissing", "check_budget"]


class ModelPackageMissing(ImportError):
    """An offline model/data package is not installed; the message holds the exact pip command.

    Example:
        >>> ModelPackageMissing("gensim", "gensim", "4.4.0").command
        'pip install --no-deps gensim==4.4.0'
    """

    def __init__(self, distribution: str, module: str, version: str) -> None:
        self.distribution = distribution
        self.command = f"pip install --no-deps {distribution}=={version}"
        super().__init__(
            f"the offline package {distribution!r} (module {module!r}) is not installed. "
            f"Install it with `{self.command}` (or all four with `tardis install-models`)."
        )


class ModelNotFound(FileNotFoundError, ValueError):
    """A model given by path does not exist, or is not a model folder or file; the message says
    what ``--model`` accepts.

    Example:
        >>> isinstance(ModelNotFound("no such folder"), OSError)
        True
    """


class DatasetTooSmall(ValueError):
    """A data set is empty, or too short for what was asked of it.

    Example:
        >>> isinstance(DatasetTooSmall("no windows"), ValueError)
        True
    """


class ContextTooLong(ValueError):
    """The requested context length exceeds what the model supports.

    Example:
        >>> isinstance(ContextTooLong("ctx 9000 > 8192"), ValueError)
        True
    """


class MethodNotApplicable(ValueError):
    """A method cannot run on this model (e.g. tardis on gated FFNs). ``run_eval`` records the
    reason under ``results["skipped"]`` and goes on with the other methods."""
