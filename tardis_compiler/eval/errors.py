"""Errors the evaluation harness raises, each saying what to do about it.

They subclass the built-in error a caller would expect (``ImportError`` for a missing package,
``ValueError`` for bad input), so ``except ValueError`` keeps working.
"""
from __future__ import annotations


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


class InvalidBudget(ValueError):
    """A budget (fraction of dense FFN weight bytes read per token) outside (0, 1], or one a
    format cannot reach.

    Example:
        >>> isinstance(InvalidBudget("budget 1.5"), ValueError)
        True
    """


def check_budget(budget: float) -> float:
    """Return ``budget`` as a float if it lies in (0, 1], else raise ``InvalidBudget``.

    Example:
        >>> check_budget(0.5)
        0.5
    """
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise InvalidBudget(f"budget must be a number in (0, 1], got {budget!r}") from None
    if not 0.0 < value <= 1.0:
        raise InvalidBudget(
            f"budget must be in (0, 1] (a fraction of the dense model's FFN weight bytes read per "
            f"token; 0.5 means half), got {budget!r}. Pass e.g. --budgets 0.3 0.5 0.7."
        )
    return value


class MethodNotApplicable(ValueError):
    """A method cannot run on this model (e.g. tardis on gated FFNs). ``run_eval`` records the
    reason under ``results["skipped"]`` and goes on with the other methods."""
