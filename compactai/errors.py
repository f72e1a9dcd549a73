"""The exceptions compactai raises.

Every error is meant for a person: one line saying what is wrong, where, and what
to do. Each class also subclasses the matching built-in, so callers may catch
``ValueError`` or ``FileNotFoundError`` as usual. The CLI maps them to exit codes
(``exit_code``): 2 for bad input, 3 for a budget that cannot be met, 1 otherwise.

Tree::

    CompactAIError
    ├── BadInputError (ValueError)                 exit 2
    │   ├── ModelNotFoundError (FileNotFoundError)
    │   ├── UnsupportedFormatError
    │   ├── UnsafeFormatError                      pickle-based files, refused unopened
    │   ├── CorruptModelError
    │   ├── InputSignatureError (TypeError)        wrong input shape or dtype
    │   ├── UnknownNameError (KeyError)            unknown example/technique/mode
    │   ├── DuplicateNameError                     a second entry registered under a taken name
    │   ├── ParameterError                          a technique parameter out of range
    │   └── MissingDependencyError (ImportError)   an optional extra is not installed
    ├── ParityError (AssertionError)               exported model diverged from the source, exit 1
    ├── TechniqueError (RuntimeError)              a technique could not be applied, exit 1
    ├── SecurityError (PermissionError)            bundle/update verification refused, exit 1
    └── BudgetNotMetError                          no candidate fits the budget, exit 3
"""

from __future__ import annotations


class CompactAIError(Exception):
    """Base of every compactai error."""

    exit_code = 1


class BadInputError(CompactAIError, ValueError):
    """The user gave something compactai cannot use."""

    exit_code = 2


class ModelNotFoundError(BadInputError, FileNotFoundError):
    """A model path does not exist."""


class UnsupportedFormatError(BadInputError):
    """A file or object whose format compactai does not read."""


class UnsafeFormatError(UnsupportedFormatError):
    """A pickle-based file: refused without being opened, because unpickling runs code."""


class CorruptModelError(BadInputError):
    """A model file that exists but cannot be parsed or fails its checker."""


class InputSignatureError(BadInputError, TypeError):
    """Inputs whose names, shapes or dtypes do not match the model's signature."""


class UnknownNameError(BadInputError, KeyError):
    """A name (example, technique, mode, criterion) that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; people should not see the quotes
        return str(self.args[0]) if self.args else ""


class DuplicateNameError(BadInputError):
    """A name (technique, criterion, student builder, example) registered twice for different entries."""


class ParameterError(BadInputError):
    """A parameter outside its allowed range."""


class MissingDependencyError(BadInputError, ImportError):
    """An optional dependency is not installed."""


class ParityError(CompactAIError, AssertionError):
    """An exported model's outputs differ from the source model's beyond tolerance."""


class TechniqueError(CompactAIError, RuntimeError):
    """A technique could not be applied to this model."""


class SecurityError(CompactAIError, PermissionError):
    """A bundle or update failed verification."""


class BudgetNotMetError(CompactAIError):
    """No candidate satisfies the budget."""

    exit_code = 3


def require(module: str, extra: str) -> None:
    """Raise MissingDependencyError with the install line if ``module`` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(
            f"This needs the '{module}' package, which is not installed. "
            f"Install it with: pip install -c constraints.txt 'compactai[{extra}]'"
        )
