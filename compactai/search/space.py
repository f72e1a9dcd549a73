"""Search spaces over pipelines: ordered stages, each an optional technique with its parameters.

The default space is built from the registry: every registered technique that accepts the
model's kind becomes an optional stage, in family order (prune -> distill -> quantize),
searching the parameters the technique marks ``searchable``. A recipe file can override
stages: a list value is a choice, ``{"low", "high", "log"}`` a range, anything else fixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compactai.errors import BadInputError, UnknownNameError
from compactai.techniques.base import AnyParam, ChoiceParam, FloatParam, IntParam, Param, Technique, available_techniques

FAMILY_ORDER = ("prune", "distill", "nas", "quantize")


@dataclass
class Stage:
    """One pipeline position: a technique, whether it may be skipped, and its search space."""

    technique: str
    optional: bool = True
    fixed: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Param] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        def spec(p: Param) -> Any:
            if isinstance(p, ChoiceParam):
                return list(p.choices)
            if isinstance(p, (FloatParam, IntParam)):
                return {"low": p.low, "high": p.high, "log": p.log}
            return p.default

        return {"technique": self.technique, "optional": self.optional, "fixed": self.fixed,
                "search": {k: spec(v) for k, v in self.search.items()}}


@dataclass
class SearchSpace:
    stages: list[Stage]

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages]}

    def sample(self, trial: Any) -> list[dict[str, Any]]:
        """A recipe (ordered steps with params) drawn through an Optuna trial (define-by-run)."""
        recipe = []
        for i, stage in enumerate(self.stages):
            prefix = f"{i}.{stage.technique}"
            if stage.optional and not trial.suggest_categorical(f"{prefix}.use", [True, False]):
                continue
            params = dict(stage.fixed)
            for name, spec in stage.search.items():
                key = f"{prefix}.{name}"
                if isinstance(spec, ChoiceParam):
                    params[name] = trial.suggest_categorical(key, list(spec.choices))
                elif isinstance(spec, FloatParam):
                    params[name] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
                elif isinstance(spec, IntParam):
                    params[name] = trial.suggest_int(key, spec.low, spec.high, log=spec.log)
            recipe.append({"technique": stage.technique, "params": params})
        return recipe

    def single_technique_trials(self) -> list[dict[str, Any]]:
        """Optuna parameter sets for "each technique alone, with its defaults" (enqueued first,
        so the search starts from the obvious candidates and the report can compare them)."""
        registry = available_techniques()
        trials = []
        for j, only in enumerate(self.stages):
            params: dict[str, Any] = {}
            for i, stage in enumerate(self.stages):
                prefix = f"{i}.{stage.technique}"
                if stage.optional:
                    params[f"{prefix}.use"] = i == j
                if i == j or not stage.optional:
                    space = registry[stage.technique].space
                    for name, spec in stage.search.items():
                        default = space[name].default if name in space else getattr(spec, "default", None)
                        if isinstance(spec, ChoiceParam) and default not in spec.choices:
                            default = spec.choices[0]
                        params[f"{prefix}.{name}"] = default
            trials.append(params)
        return trials


def _param_from_override(name: str, value: Any, base: Param | None) -> Param | None:
    if isinstance(value, list):
        return ChoiceParam(tuple(value), value[0])
    if isinstance(value, dict) and {"low", "high"} <= set(value):
        low, high = value["low"], value["high"]
        if isinstance(low, int) and isinstance(high, int) and not isinstance(base, FloatParam):
            return IntParam(low, high, low, bool(value.get("log", False)))
        return FloatParam(float(low), float(high), float(low), bool(value.get("log", False)))
    return None


def default_space(kind: str, framework: str = "torch", techniques: list[str] | None = None) -> SearchSpace:
    """Every registered technique that fits the model kind and framework, as optional stages."""
    registry = available_techniques()
    names = techniques or [n for n, cls in registry.items() if kind in cls.kinds and _reachable(cls, framework)]
    for name in names:
        if name not in registry:
            raise UnknownNameError(f"Unknown technique '{name}'; registered techniques: {', '.join(registry)}.")
    names = sorted(names, key=lambda n: (FAMILY_ORDER.index(registry[n].family) if registry[n].family in FAMILY_ORDER
                                         else len(FAMILY_ORDER), n))
    stages = []
    for name in names:
        cls = registry[name]
        search = {p: cls.space[p] for p in cls.searchable if p in cls.space and not isinstance(cls.space[p], AnyParam)}
        stages.append(Stage(name, optional=True, search=search))
    return SearchSpace(stages)


def _reachable(cls: type[Technique], framework: str) -> bool:
    return framework in cls.accepts or framework == "torch"


def space_from_config(stages: list[dict[str, Any]]) -> SearchSpace:
    """A space from a recipe file's ``search_space`` list (validated against the registry)."""
    registry = available_techniques()
    result = []
    for entry in stages:
        name = entry.get("technique")
        if name not in registry:
            raise UnknownNameError(f"Unknown technique '{name}' in search_space; registered: {', '.join(registry)}.")
        cls = registry[name]
        fixed: dict[str, Any] = {}
        search: dict[str, Param] = {}
        for pname, value in (entry.get("params") or {}).items():
            if pname not in cls.space:
                raise BadInputError(
                    f"Technique '{name}' has no parameter '{pname}'; its parameters are {', '.join(cls.space)}."
                )
            spec = _param_from_override(pname, value, cls.space[pname])
            if spec is None:
                fixed[pname] = value
            else:
                search[pname] = spec
        if not entry.get("params"):
            search = {p: cls.space[p] for p in cls.searchable if p in cls.space and not isinstance(cls.space[p], AnyParam)}
        result.append(Stage(name, optional=bool(entry.get("optional", True)), fixed=fixed, search=search))
    return SearchSpace(result)
