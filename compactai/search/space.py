"""Search spaces over pipelines: ordered stages, each an optional technique with its parameters.

The default space is built from the registry: one optional stage per family, in family
order (prune -> distill|nas -> quantize), choosing among that family's registered techniques
that accept the model's kind, searching the ranges of its ``search_space`` (and fixing or
narrowing those its ``search_defaults(kind)`` gives). A recipe file can override
stages: a list value is a choice, ``{"low", "high", "log"}`` a range, anything else fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from compactai.budget import Budget
from compactai.errors import BadInputError, UnknownNameError
from compactai.models.handle import ModelHandle
from compactai.tasks import Task
from compactai.techniques.base import (
    ChoiceParam,
    FloatParam,
    IntParam,
    Param,
    Range,
    Technique,
    available_techniques,
)

FAMILY_ORDER = ("prune", "distill", "quantize")
# families that share another's pipeline position: NAS and distillation both train a new, smaller model
# from the incoming one, so one stage chooses between them (a recipe never runs both)
STAGE_OF = {"nas": "distill"}


@dataclass
class Stage:
    """One pipeline position: one of several techniques of a family (or none, if optional),
    each with fixed parameters and a search space."""

    techniques: list[str]
    optional: bool = True
    fixed: dict[str, dict[str, Any]] = field(default_factory=dict)  # technique -> fixed params
    search: dict[str, dict[str, Range]] = field(default_factory=dict)  # technique -> param specs

    @property
    def label(self) -> str:
        return "|".join(self.techniques)

    def to_dict(self) -> dict[str, Any]:
        def spec(p: Range) -> Any:
            if isinstance(p, ChoiceParam):
                return list(p.choices)
            return {"low": p.low, "high": p.high, "log": p.log}

        return {"techniques": self.techniques, "optional": self.optional, "fixed": self.fixed,
                "search": {t: {k: spec(v) for k, v in self.search.get(t, {}).items()} for t in self.techniques}}


SKIP = "skip"


@dataclass
class SearchSpace:
    stages: list[Stage]
    skipped: dict[str, str] = field(default_factory=dict)  # technique -> why it cannot apply to the model

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages], "skipped": dict(self.skipped),
                "candidates": self.size()}

    def enumerate(self) -> list[dict[str, Any]] | None:
        """Optuna parameters of every distinct recipe the space allows (one per recipe, in a fixed
        order), or None when a stage searches a continuous range (the space is not finite)."""
        import itertools

        from optuna.trial import FixedTrial

        axes: list[tuple[str, tuple[Any, ...]]] = []
        for i, stage in enumerate(self.stages):
            options = stage.techniques + ([SKIP] if stage.optional else [])
            if len(options) > 1:
                axes.append((f"{i}.technique", tuple(options)))
            for name in stage.techniques:
                for pname, spec in stage.search.get(name, {}).items():
                    if not isinstance(spec, ChoiceParam):
                        return None
                    axes.append((f"{i}.{name}.{pname}", tuple(spec.choices)))
        distinct: dict[str, dict[str, Any]] = {}
        for values in itertools.product(*(choices for _, choices in axes)):
            params = dict(zip((key for key, _ in axes), values))
            key = recipe_key(self.sample(FixedTrial(params)))
            distinct.setdefault(key, params)
            if len(distinct) > 10_000:
                return None  # too many to list: treated as not finite
        return list(distinct.values())

    def size(self) -> int | None:
        """How many distinct recipes the space allows (None: not finite)."""
        listed = self.enumerate()
        return None if listed is None else len(listed)

    def sample(self, trial: Any) -> list[dict[str, Any]]:
        """A recipe (ordered steps with params) drawn through an Optuna trial (define-by-run); each
        technique's params are canonical (those that cannot matter given the others are dropped)."""
        registry = available_techniques()
        recipe = []
        for i, stage in enumerate(self.stages):
            options = stage.techniques + ([SKIP] if stage.optional else [])
            name = options[0] if len(options) == 1 else trial.suggest_categorical(f"{i}.technique", options)
            if name == SKIP:
                continue
            params = dict(stage.fixed.get(name, {}))
            for pname, spec in stage.search.get(name, {}).items():
                key = f"{i}.{name}.{pname}"
                if isinstance(spec, ChoiceParam):
                    params[pname] = trial.suggest_categorical(key, list(spec.choices))
                elif isinstance(spec, FloatParam):
                    params[pname] = trial.suggest_float(key, spec.low, spec.high, log=spec.log)
                elif isinstance(spec, IntParam):
                    params[pname] = trial.suggest_int(key, spec.low, spec.high, log=spec.log)
            recipe.append({"technique": name, "params": registry[name].canonical(params)})
        return recipe

    def _defaults(self, index: int, name: str) -> dict[str, Any]:
        registry = available_techniques()
        stage = self.stages[index]
        space = registry[name].space
        params: dict[str, Any] = {}
        for pname, spec in stage.search.get(name, {}).items():
            default = stage.fixed.get(name, {}).get(pname, spec.default)
            if default is None and pname in space:
                default = space[pname].default
            if isinstance(spec, ChoiceParam) and default not in spec.choices:
                default = spec.choices[0]
            if isinstance(spec, (FloatParam, IntParam)) and (default is None or not spec.low <= default <= spec.high):
                default = spec.low
            params[f"{index}.{name}.{pname}"] = default
        return params

    def _pipeline(self, chosen: dict[int, str]) -> dict[str, Any]:
        """Optuna parameters selecting ``chosen[stage index] = technique`` (others skipped)."""
        params: dict[str, Any] = {}
        for i, stage in enumerate(self.stages):
            options = stage.techniques + ([SKIP] if stage.optional else [])
            if len(options) > 1:
                params[f"{i}.technique"] = chosen.get(i, SKIP)
            if i in chosen:
                params.update(self._defaults(i, chosen[i]))
        return params

    def seed_trials(self) -> list[dict[str, Any]]:
        """Trials enqueued before the sampler takes over, cheapest first: each technique alone
        with its defaults (so the report can compare combinations with single techniques), the
        stack of every stage's cheapest technique that does not train a new model, and each
        technique that trains a new model followed by the last stage's cheapest (a student, then int8)."""
        registry = available_techniques()
        if not all(s.optional for s in self.stages):
            return []
        singles = sorted(((registry[name].cost, i, name) for i, stage in enumerate(self.stages)
                          for name in stage.techniques), key=lambda item: (item[0], item[1]))
        trials: list[tuple[float, dict[str, Any]]] = [(cost, self._pipeline({i: name})) for cost, i, name in singles]
        stack: dict[int, str] = {}
        for i, stage in enumerate(self.stages):
            cheapest = min(stage.techniques, key=lambda n: registry[n].cost)
            if registry[cheapest].cost < 3:
                stack[i] = cheapest
        if len(stack) > 1:
            trials.append((max(registry[n].cost for n in stack.values()) + 0.5, self._pipeline(stack)))
        last = len(self.stages) - 1
        final = min(self.stages[last].techniques, key=lambda n: registry[n].cost) if self.stages else None
        for cost, i, name in singles:
            if cost >= 3 and i < last and final is not None and registry[final].cost < 3:
                trials.append((cost + 0.5, self._pipeline({i: name, last: final})))
        return [params for _, params in sorted(trials, key=lambda item: item[0])]


def recipe_key(recipe: list[dict[str, Any]]) -> str:
    """The identity of a recipe: two recipes with the same key build the same model."""
    import json

    return json.dumps(recipe, sort_keys=True, default=str)


def space_for_model(handle: ModelHandle, task: Task | None, budget: Budget | None = None,
                    techniques: list[str] | None = None,
                    overrides: dict[str, dict[str, Any]] | None = None) -> SearchSpace:
    """The default space derived from this model: techniques that cannot apply to it (or its task
    data) are left out with the reason (``space.skipped``), and each technique's settings come
    from ``search_defaults_for`` (students from its real depth, the formats its runtime runs, a
    quantize guard rail that follows the budget)."""
    registry = available_techniques()
    names = _technique_names(techniques, lambda cls: True)
    skipped: dict[str, str] = {}
    usable = []
    for name in names:
        reason = registry[name].why_not(handle, task)
        if reason:
            skipped[name] = reason
        else:
            usable.append(name)
    constrained = budget.keys if budget is not None else set()
    defaults = {n: registry[n].search_defaults_for(handle, constrained) for n in usable}
    space = _build(usable, defaults, overrides)
    space.skipped = skipped
    return space


def _param_from_override(value: Any, base: Param | None) -> Range | None:
    if isinstance(value, list):
        return ChoiceParam(tuple(value), value[0])
    if isinstance(value, dict) and {"low", "high"} <= set(value):
        low, high = value["low"], value["high"]
        if isinstance(low, int) and isinstance(high, int) and not isinstance(base, FloatParam):
            return IntParam(low, high, low, bool(value.get("log", False)))
        return FloatParam(float(low), float(high), float(low), bool(value.get("log", False)))
    return None


def default_space(kind: str, framework: str = "torch", techniques: list[str] | None = None,
                  overrides: dict[str, dict[str, Any]] | None = None) -> SearchSpace:
    """One optional stage per family (prune -> distill -> quantize), each choosing among the
    registered techniques that fit the model kind and framework; techniques that set
    ``in_default_search = False`` are only searched when named."""
    registry = available_techniques()
    names = _technique_names(techniques, lambda cls: kind in cls.kinds and _reachable(cls, framework))
    return _build(names, {n: registry[n].search_defaults(kind) for n in names}, overrides)


def _technique_names(techniques: list[str] | None, fits: Callable[[type[Technique]], bool]) -> list[str]:
    """The techniques named (each checked against the registry), else every registered one that
    ``fits`` and does not set ``in_default_search = False``."""
    registry = available_techniques()
    if techniques:
        for name in techniques:
            if name not in registry:
                raise UnknownNameError(f"Unknown technique '{name}'; registered techniques: {', '.join(registry)}.")
        return list(techniques)
    return [n for n, cls in registry.items() if fits(cls) and getattr(cls, "in_default_search", True)]


def _build(names: list[str], defaults: dict[str, dict[str, Any]],
           overrides: dict[str, dict[str, Any]] | None) -> SearchSpace:
    """One optional stage per family, in FAMILY_ORDER; ``defaults[name]``: fixed values and ranges."""
    registry = available_techniques()
    families: dict[str, list[str]] = {}
    for name in names:
        family = registry[name].family
        families.setdefault(STAGE_OF.get(family, family), []).append(name)
    order = sorted(families, key=lambda f: FAMILY_ORDER.index(f) if f in FAMILY_ORDER else len(FAMILY_ORDER))
    stages = []
    for family in order:
        members = sorted(families[family])
        search = {n: searched_params(registry[n]) for n in members}
        fixed: dict[str, dict[str, Any]] = {}
        for n in members:
            fixed[n] = {}
            for pname, value in defaults[n].items():
                if isinstance(value, (ChoiceParam, FloatParam, IntParam)):
                    search[n][pname] = value  # a kind-specific range to search
                else:
                    fixed[n][pname] = value
                    search[n].pop(pname, None)
            for pname, value in (overrides or {}).get(n, {}).items():
                spec = _param_from_override(value, registry[n].space.get(pname))
                if spec is None:
                    fixed.setdefault(n, {})[pname] = value
                    search[n].pop(pname, None)
                else:
                    search[n][pname] = spec
        stages.append(Stage(members, optional=True, fixed=fixed, search=search))
    return SearchSpace(stages)


def searched_params(cls: type[Technique]) -> dict[str, Range]:
    """The ranges the optimizer explores for a technique by default: its ``search_space``."""
    return dict(cls.search_space)


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
        search: dict[str, Range] = {}
        for pname, value in (entry.get("params") or {}).items():
            if pname not in cls.space:
                raise BadInputError(
                    f"Technique '{name}' has no parameter '{pname}'; its parameters are {', '.join(cls.space)}."
                )
            spec = _param_from_override(value, cls.space[pname])
            if spec is None:
                fixed[pname] = value
            else:
                search[pname] = spec
        if not entry.get("params"):
            search = searched_params(cls)
        result.append(Stage([name], optional=bool(entry.get("optional", True)), fixed={name: fixed},
                            search={name: search}))
    return SearchSpace(result)
