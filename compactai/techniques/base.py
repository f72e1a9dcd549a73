"""The Technique contract, its context, the declared parameter spaces and the registry.

A technique implements one method, ``apply(handle, context) -> handle``. Its constructor
only stores parameters; ``validate()`` checks them against the declared ``space`` when
the work starts. ``@register_technique`` makes it known to the search, CLI and report.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from compactai.errors import ParameterError, TechniqueError, UnknownNameError
from compactai.models.handle import ModelHandle
from compactai.tasks import Task


@dataclass(frozen=True)
class FloatParam:
    low: float
    high: float
    default: float
    log: bool = False
    open_low: bool = False  # the range is (low, high] instead of [low, high]
    open_high: bool = False

    def check(self, owner: str, name: str, value: Any) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            ok = (value > self.low if self.open_low else value >= self.low) and (
                value < self.high if self.open_high else value <= self.high)
        if not ok:
            left, right = "(" if self.open_low else "[", ")" if self.open_high else "]"
            raise ParameterError(
                f"The '{name}' parameter of {owner} must be a float in the range "
                f"{left}{self.low:g}, {self.high:g}{right}. Got {value!r} instead."
            )
        return float(value)


@dataclass(frozen=True)
class IntParam:
    low: int
    high: int
    default: int
    log: bool = False

    def check(self, owner: str, name: str, value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not self.low <= value <= self.high:
            raise ParameterError(
                f"The '{name}' parameter of {owner} must be an int in the range [{self.low}, {self.high}]. "
                f"Got {value!r} instead."
            )
        return value


@dataclass(frozen=True)
class ChoiceParam:
    choices: tuple[Any, ...]
    default: Any

    def check(self, owner: str, name: str, value: Any) -> Any:
        if value not in self.choices:
            raise ParameterError(
                f"The '{name}' parameter of {owner} must be one of {', '.join(map(str, self.choices))}. "
                f"Got {value!r} instead."
            )
        return value


@dataclass(frozen=True)
class AnyParam:
    """A parameter the search does not tune (layer lists, callables, paths)."""

    default: Any = None

    def check(self, owner: str, name: str, value: Any) -> Any:
        return value


Param = FloatParam | IntParam | ChoiceParam | AnyParam


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

    def time_left(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def out_of_time(self) -> bool:
        left = self.time_left()
        return left is not None and left <= 0


class Technique(ABC):
    """One way of scaling a model down. Subclasses set ``name``, ``family``, ``space``
    and ``accepts`` (frameworks of the handles ``apply`` takes) and implement ``apply``."""

    name: ClassVar[str]
    family: ClassVar[str]
    space: ClassVar[dict[str, Param]] = {}
    accepts: ClassVar[tuple[str, ...]] = ("torch",)
    kinds: ClassVar[tuple[str, ...]] = ("cnn", "mlp", "transformer", "generic")
    searchable: ClassVar[tuple[str, ...]] = ()  # parameters the search tunes by default
    quick: ClassVar[dict[str, Any]] = {}  # parameters for a fast run (contract test, smoke runs)
    # Ranges the optimizer explores (narrower than ``space``, which is what is *allowed*);
    # empty means: the ``searchable`` entries of ``space``.
    search_space: ClassVar[dict[str, Param]] = {}
    in_default_search: ClassVar[bool] = True  # False: searched only when named (e.g. no speed-up expected)
    # Rough cost of one application: 0 seconds-cheap (PTQ), 1 a short fine-tune, 2 training, 3 training a new
    # model. The optimizer tries cheap candidates first so an anytime run has results early.
    cost: ClassVar[int] = 1

    @classmethod
    def search_defaults(cls, kind: str) -> dict[str, Any]:
        """The optimizer's settings on a model of ``kind``: plain values are fixed, param specs
        (ChoiceParam, FloatParam, IntParam) are kind-specific ranges to search."""
        return {}

    def __init__(self, **params: Any) -> None:
        self.params = params

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.params.items())})"

    def validate(self) -> dict[str, Any]:
        """Parameters with defaults filled in, each checked against ``space``."""
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

    @abstractmethod
    def apply(self, handle: ModelHandle, context: Context) -> ModelHandle:
        """Return a new, scaled-down handle; never modify ``handle`` in place."""

    def record(self, handle: ModelHandle, params: dict[str, Any], **decisions: Any) -> ModelHandle:
        """Append this step (name, params, decisions as plain data) to ``handle``'s history."""
        history = list(handle.metadata.get("history", []))
        plain = {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))}
        history.append({"technique": self.name, "params": plain, "decisions": decisions})
        handle.metadata["history"] = history
        return handle


TECHNIQUES: dict[str, type[Technique]] = {}


def register_technique(cls: type[Technique]) -> type[Technique]:
    """Class decorator: make a technique known by its ``name``."""
    if cls.name in TECHNIQUES and TECHNIQUES[cls.name] is not cls:
        raise ValueError(f"A technique named '{cls.name}' is already registered ({TECHNIQUES[cls.name].__name__}).")
    TECHNIQUES[cls.name] = cls
    return cls


def create_technique(name: str, **params: Any) -> Technique:
    """Build a registered technique by name; an unknown name lists the known ones."""
    from compactai.techniques import load_all

    load_all()
    if name not in TECHNIQUES:
        raise UnknownNameError(f"Unknown technique '{name}'; registered techniques: {', '.join(sorted(TECHNIQUES))}.")
    return TECHNIQUES[name](**params)


def available_techniques() -> dict[str, type[Technique]]:
    from compactai.techniques import load_all

    load_all()
    return dict(sorted(TECHNIQUES.items()))
