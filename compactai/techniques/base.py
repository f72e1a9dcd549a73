"""The Technique contract, its context, the declared parameter spaces and the registry.

A technique implements one method, ``_apply(handle, context, params) -> (handle, decisions)``;
callers use ``apply(handle, context) -> handle``, which checks the parameters against the
declared ``space`` (scikit-learn's constraint table: ranges, choices, registry names, lists of
strings, callables, None-able), checks the handle's framework, and records the step. The
constructor only stores parameters. ``@register_technique`` makes it known to the search, CLI
and report.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, final

from compactai._registry import Registry
from compactai.errors import ParameterError, TechniqueError
from compactai.models.handle import ModelHandle
from compactai.tasks import Task


class _Constraint:
    """What every declared parameter type shares: ``check`` raises scikit-learn's message form
    ("The 'ratio' parameter of StructuredPrune must be a float in the range (0, 1). Got 1.5
    instead.") unless ``accepts(value)``, and returns the value as the technique will use it."""

    default: Any

    def describe(self) -> str:
        raise NotImplementedError

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def convert(self, value: Any) -> Any:
        return value

    def check(self, owner: str, name: str, value: Any) -> Any:
        if not self.accepts(value):
            raise ParameterError(
                f"The '{name}' parameter of {owner} must be {self.describe()}. Got {value!r} instead."
            )
        return self.convert(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class FloatParam(_Constraint):
    """A float in [low, high] (either end open on request; infinite ends allowed)."""

    low: float
    high: float
    default: Any = None
    log: bool = False
    open_low: bool = False  # the range is (low, high] instead of [low, high]
    open_high: bool = False

    def describe(self) -> str:
        if self.low == -math.inf and self.high == math.inf:
            return "a float"
        left, right = "(" if self.open_low else "[", ")" if self.open_high or self.high == math.inf else "]"
        left = "(" if self.low == -math.inf else left
        return f"a float in the range {left}{self.low:g}, {self.high:g}{right}"

    def accepts(self, value: Any) -> bool:
        return _is_number(value) and (value > self.low if self.open_low else value >= self.low) and (
            value < self.high if self.open_high else value <= self.high)

    def convert(self, value: Any) -> float:
        return float(value)


@dataclass(frozen=True)
class IntParam(_Constraint):
    low: int
    high: int
    default: Any = None
    log: bool = False

    def describe(self) -> str:
        return f"an int in the range [{self.low}, {self.high}]"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high


@dataclass(frozen=True)
class ChoiceParam(_Constraint):
    choices: tuple[Any, ...]
    default: Any

    def describe(self) -> str:
        return f"one of {', '.join(map(str, self.choices))}"

    def accepts(self, value: Any) -> bool:
        return value in self.choices


@dataclass(frozen=True)
class NameParam(_Constraint):
    """A name from a registry that may grow (plugins): checked against its names when the work starts."""

    registry: Registry[Any]
    default: str

    def describe(self) -> str:
        return f"one of {', '.join(self.registry.names())}"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.registry


@dataclass(frozen=True)
class StringsParam(_Constraint):
    """A list of strings (layer or node names); with ``single_ok`` one string stands for a list of one."""

    default: tuple[str, ...] = ()
    single_ok: bool = False

    def describe(self) -> str:
        return "a list of str" + (" or a str" if self.single_ok else "")

    def accepts(self, value: Any) -> bool:
        if isinstance(value, str):
            return self.single_ok
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)

    def convert(self, value: Any) -> list[str]:
        return [value] if isinstance(value, str) else list(value)


@dataclass(frozen=True)
class CallableParam(_Constraint):
    """A function given through the Python API (a loss, an augmentation, a latency probe)."""

    default: Any = None
    signature: str = ""  # shown in the message, e.g. "handle -> ms"

    def describe(self) -> str:
        return f"a callable ({self.signature})" if self.signature else "a callable"

    def accepts(self, value: Any) -> bool:
        return callable(value)


@dataclass(frozen=True)
class TypeParam(_Constraint):
    """An instance of one of ``types`` (a dict of options, a list of configurations, ...)."""

    types: tuple[type, ...]
    default: Any = None

    def describe(self) -> str:
        return "an instance of " + " or ".join(f"'{t.__name__}'" for t in self.types)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, self.types) and not (isinstance(value, bool) and bool not in self.types)


@dataclass(frozen=True)
class NoneOr(_Constraint):
    """``inner``, or None (the default) meaning "not given"."""

    inner: _Constraint
    default: Any = None

    def describe(self) -> str:
        return f"{self.inner.describe()} or None"

    def accepts(self, value: Any) -> bool:
        return value is None or self.inner.accepts(value)

    def convert(self, value: Any) -> Any:
        return None if value is None else self.inner.convert(value)


Param = FloatParam | IntParam | ChoiceParam | NameParam | StringsParam | CallableParam | TypeParam | NoneOr
Range = FloatParam | IntParam | ChoiceParam  # the types a search explores


@dataclass
class Context:
    """What a technique may use besides the model: the task, the original (teacher) model,
    a seed, a work directory, a progress callback and a deadline (time.monotonic())."""

    task: Task
    teacher: ModelHandle | None = None
    seed: int = 0
    work_dir: Path = field(default_factory=lambda: Path.cwd() / ".compactai-work")
    progress: Callable[[str], None] = field(default=lambda message: None)
    deadline: float | None = None
    threads: int | None = None
    # multi-fidelity scheduling (search/engine.py): a training technique (``fidelity_param`` set) pauses at
    # the end of this epoch, its checkpoint kept, and a later call with a larger value continues from it
    stop_epoch: int | None = None

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def out_of_time(self) -> bool:
        left = self.time_left()
        return left is not None and left <= 0


class Technique(ABC):
    """One way of scaling a model down. Subclasses set ``name``, ``family``, ``space`` and
    ``accepts`` (frameworks of the handles they take) and implement one method, ``_apply``.

    ``apply`` is the template around it (Olive's ``run()`` around ``_run_for_config``): it checks
    the parameters against ``space`` and the handle's framework against ``accepts``, calls
    ``_apply`` with the checked parameters, and records the step in the result's history."""

    name: ClassVar[str]
    family: ClassVar[str]
    space: ClassVar[dict[str, Param]] = {}
    accepts: ClassVar[tuple[str, ...]] = ("torch",)
    kinds: ClassVar[tuple[str, ...]] = ("cnn", "mlp", "transformer", "generic")
    quick: ClassVar[dict[str, Any]] = {}  # parameters for a fast run (contract test, smoke runs)
    # Ranges the optimizer explores by default (narrower than ``space``, which is what is *allowed*).
    search_space: ClassVar[dict[str, Range]] = {}
    in_default_search: ClassVar[bool] = True  # False: searched only when named (e.g. no speed-up expected)
    # Rough cost of one application: 0 seconds-cheap (PTQ), 1 a short fine-tune, 2 training, 3 training a new
    # model. The optimizer tries cheap candidates first so an anytime run has results early.
    cost: ClassVar[int] = 1
    # The whole-number parameter that is a training technique's resource (its epochs): the optimizer's
    # multi-fidelity schedule trains such a step in rungs of it (``Context.stop_epoch``). None: not trained.
    fidelity_param: ClassVar[str | None] = None

    @classmethod
    def search_defaults(cls, kind: str) -> dict[str, Any]:
        """The optimizer's settings on a model of ``kind``: plain values are fixed, param specs
        (ChoiceParam, FloatParam, IntParam) are kind-specific ranges to search."""
        return {}

    @classmethod
    def why_not(cls, handle: ModelHandle, task: Task | None) -> str | None:
        """Why this technique cannot apply to ``handle`` (with ``task``), or None. The optimizer
        skips a technique with a reason, and records it, rather than running trials that must fail."""
        if handle.kind not in cls.kinds:
            return f"it is not made for {handle.kind} models (only {', '.join(cls.kinds)})"
        if handle.framework not in cls.accepts and not (handle.framework == "torch" and "onnx" in cls.accepts):
            names = {"onnx": "an ONNX", "torch": "a torch"}
            return (f"it needs {' or '.join(names.get(a, a) for a in cls.accepts)} model, and '{handle.name}' is "
                    f"{names.get(handle.framework, handle.framework)} model (give the torch model to use it)")
        return None

    @classmethod
    def search_defaults_for(cls, handle: ModelHandle, constrained: set[str]) -> dict[str, Any]:
        """The optimizer's settings for this model (``constrained``: the budget's keys, e.g.
        {"size_mb", "latency_p90_ms"}); by default those for its kind (``search_defaults``)."""
        return cls.search_defaults(handle.kind)

    @classmethod
    def canonical(cls, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` without those that cannot change the result given the others (e.g. the
        calibration of a dynamic int8 model), so the search does not run the same model twice."""
        return params

    def __init__(self, **params: Any) -> None:
        self.params = params

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"

    def validate(self) -> dict[str, Any]:
        """Parameters with defaults filled in, each checked against ``space`` (callers may run it
        early, e.g. before loading a model; ``apply`` runs it anyway)."""
        owner = type(self).__name__
        unknown = sorted(set(self.params) - set(self.space))
        if unknown:
            raise ParameterError(
                f"{owner} has no parameter {', '.join(map(repr, unknown))}; its parameters are "
                f"{', '.join(self.space) or 'none'}."
            )
        return {name: spec.check(owner, name, self.params.get(name, spec.default)) for name, spec in self.space.items()}

    def check_accepts(self, handle: ModelHandle) -> None:
        if handle.framework not in self.accepts:
            raise TechniqueError(
                f"{type(self).__name__} needs a {' or '.join(self.accepts)} model, but '{handle.name}' is "
                f"{handle.framework}; order the pipeline so that {self.name} comes before export/quantization."
            )

    @final
    def apply(self, handle: ModelHandle, context: Context) -> ModelHandle:
        """A new, scaled-down handle with this step appended to its ``history``; ``handle`` is not modified."""
        params = self.validate()
        self.check_accepts(handle)
        result, decisions = self._apply(handle, context, params)
        if result is handle:
            raise TechniqueError(f"{type(self).__name__} returned its input handle; derive a new one instead.")
        history = [*result.metadata.get("history", []),
                   {"technique": self.name, "params": {k: v for k, v in params.items() if _is_plain(v)},
                    "decisions": decisions}]
        result.metadata = {**result.metadata, "history": history}  # a new dict: never shared with the input's
        return result

    @abstractmethod
    def _apply(self, handle: ModelHandle, context: Context, params: dict[str, Any]
               ) -> tuple[ModelHandle, dict[str, Any]]:
        """The technique's work on a handle it accepts, with ``params`` checked and defaults filled in.
        Returns the new handle (never ``handle`` modified in place) and the decisions to record, as
        plain data (what was removed, which configuration was kept and why)."""


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is JSON data (callables, modules and arrays are left out of the record)."""
    if isinstance(value, (str, int, float, bool, type(None))):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


TECHNIQUES: Registry[type[Technique]] = Registry("technique")


def register_technique(cls: type[Technique]) -> type[Technique]:
    """Class decorator: make a technique known by its ``name``."""
    return TECHNIQUES.register(cls.name, cls)


def create_technique(name: str, **params: Any) -> Technique:
    """Build a registered technique by name; an unknown name lists the known ones."""
    from compactai.techniques import load_all

    load_all()
    return TECHNIQUES.get(name)(**params)


def available_techniques() -> dict[str, type[Technique]]:
    from compactai.techniques import load_all

    load_all()
    return dict(sorted(TECHNIQUES.items()))
