"""Re-measuring the contenders before selection.

Each trial's latency was measured once, minutes apart from the others, on a machine whose load
comes and goes; two graphs of the same structure have measured 2x apart that way. Before the
choice, the trials that could win (every non-latency constraint met) are measured again with
the original model in interleaved rounds, so a change in load hits all of them alike, and each
gets the median over rounds. A relative latency budget ("0.5x") is resolved again against the
original's figure from the same rounds.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from compactai.budget import Budget
from compactai.measure import MeasureConfig, interleaved_latency
from compactai.models.handle import ModelHandle
from compactai.search.trial import TrialResult

LATENCY_KEYS = ("latency_p50_ms", "latency_p90_ms")


def recipe_key(trial: TrialResult) -> str:
    return json.dumps(trial.recipe, sort_keys=True, default=str)


def contenders(trials: list[TrialResult], budget: Budget, limit: int) -> list[TrialResult]:
    """Up to ``limit`` finished trials that meet every constraint but the latency ones, fastest
    first, one per recipe (the sampler may propose a recipe again; its result is reused, and it
    is one model to measure)."""
    other = Budget([c for c in budget.constraints if c.key not in LATENCY_KEYS])
    able = [t for t in trials if t.status == "ok" and t.artifact and other.satisfied(t.figures)]
    unique: dict[str, TrialResult] = {}
    for trial in sorted(able, key=lambda t: t.figures.get("latency_p90_ms", float("inf"))):
        unique.setdefault(recipe_key(trial), trial)
    return list(unique.values())[:limit]


def remeasure(
    baseline: ModelHandle,
    candidates: list[tuple[TrialResult, ModelHandle]],
    config: MeasureConfig,
    rounds: int = 3,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, float]:
    """Measure batch-1 latency of ``baseline`` and every candidate in ``rounds`` interleaved rounds;
    write each candidate's medians into its figures (the search's own values kept as
    ``search_latency_*``) and return the baseline's medians."""
    measured = interleaved_latency(
        [baseline, *(handle for _, handle in candidates)], config, rounds,
        lambda r: progress(f"re-measuring the original and {len(candidates)} contender(s), round {r + 1}/{rounds}"))
    for (trial, _), figures in zip(candidates, measured[1:]):
        for key in LATENCY_KEYS:
            trial.figures.setdefault(f"search_{key}", trial.figures.get(key))
        trial.figures.update(figures)
    return {k: measured[0][k] for k in LATENCY_KEYS} | {"rounds": rounds}


def interleave_final(baseline: dict[str, Any], chosen: dict[str, Any], handles: tuple[ModelHandle, ModelHandle],
                     config: MeasureConfig, rounds: int, progress: Callable[[str], None] = lambda m: None) -> None:
    """The final original-vs-chosen comparison: each model's full measurement ran once, at its own
    moment; re-time both in ``rounds`` interleaved rounds and report the medians as their p50/p90
    (the single run's values are kept as ``single_run_latency_*``; its samples still feed the
    latency distribution plot)."""
    if rounds < 1:
        return
    measured = interleaved_latency(list(handles), config, rounds,
                                   lambda r: progress(f"final latency, original and chosen in turn: round {r + 1}/{rounds}"))
    for figures, medians in zip((baseline, chosen), measured):
        for key in LATENCY_KEYS:
            figures[f"single_run_{key}"] = figures.get(key)
        figures.update(medians)
        figures["latency_rounds"] = rounds


def rescore(trials: list[TrialResult], budget: Budget) -> None:
    """Feasibility and distance to the budget again, after figures changed."""
    for trial in trials:
        if trial.status == "ok":
            trial.feasible = budget.satisfied(trial.figures)
            trial.violation = budget.violation(trial.figures)


def interleaved_selection_figures(
    load: Callable[[TrialResult], ModelHandle],
    baseline: ModelHandle,
    trials: list[TrialResult],
    requested: Budget,
    resolved: Budget,
    baseline_figures: dict[str, Any],
    config: MeasureConfig,
    *,
    limit: int = 6,
    rounds: int = 3,
    progress: Callable[[str], None] = lambda message: None,
) -> tuple[Budget, dict[str, Any] | None]:
    """Re-measure the contenders (see the module docstring); returns the budget to select with
    (re-resolved when it had relative latency terms) and what was done, or None when there was
    nothing to compare (no latency constraint, or no contender)."""
    if rounds < 1 or not resolved.keys & set(LATENCY_KEYS):
        return resolved, None
    chosen = contenders(trials, resolved, limit)
    if not chosen:
        return resolved, None
    original = remeasure(baseline, [(t, load(t)) for t in chosen], config, rounds, progress)
    measured = {recipe_key(t): t for t in chosen}
    for trial in trials:  # repeats of a measured recipe are the same model: same figures
        source = measured.get(recipe_key(trial))
        if trial.status == "ok" and source is not None and source is not trial:
            for key in LATENCY_KEYS:
                trial.figures.setdefault(f"search_{key}", trial.figures.get(key))
            trial.figures.update({k: source.figures[k] for k in (*LATENCY_KEYS, "latency_rounds_ms")})
    budget = requested.resolve({**baseline_figures, **original})
    rescore(trials, budget)
    report = {"rounds": rounds, "trials": [t.number for t in chosen], "baseline": original,
              "budget": str(budget), "budget_before": str(resolved)}
    progress(f"budget after re-measuring: {budget}")
    return budget, report


__all__ = ["contenders", "interleave_final", "interleaved_selection_figures", "remeasure", "rescore"]
