"""Targets and plans: how many elements to remove, and which, to reach a reduction target.

A *plan* maps each unit's name to the element indices to remove. ``plan_for(units, fraction)``
removes ``fraction`` of every unit (per-layer ranking) or of all units of a kind together
(global ranking). ``solve`` searches the fraction that reaches a target reduction of units,
parameters, MACs or *measured* ONNX Runtime latency.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from compactai.errors import TechniqueError
from compactai.techniques.prune.engine import Unit

TARGETS = ("channels", "params", "macs", "latency")
MAX_UNIT_FRACTION = 0.9  # global ranking never empties a layer: it keeps at least 10% of each unit


def _keep_count(size: int, remove: int, round_to: int | None) -> int:
    keep = max(1, size - remove)
    if round_to and round_to > 1 and size > round_to:
        keep = max(round_to, math.ceil(keep / round_to) * round_to)
    return min(size, keep)


def plan_for(units: list[Unit], fraction: float, ranking: str = "layer", round_to: int | None = None) -> dict[str, list[int]]:
    """Element indices to remove from each unit, lowest scores first."""
    plan: dict[str, list[int]] = {}
    if fraction <= 0:
        return {u.name: [] for u in units}
    if ranking == "layer":
        for unit in units:
            assert unit.scores is not None
            keep = _keep_count(unit.size, math.floor(fraction * unit.size), round_to if unit.kind != "heads" else None)
            plan[unit.name] = sorted(int(i) for i in np.argsort(unit.scores, kind="stable")[: unit.size - keep])
        return plan
    for kind in {u.kind for u in units}:  # global: one threshold per kind (heads and neurons differ in size)
        members = [u for u in units if u.kind == kind]
        scores = np.concatenate([u.scores for u in members if u.scores is not None])
        remove = math.floor(fraction * len(scores))
        threshold = np.sort(scores, kind="stable")[remove - 1] if remove > 0 else -np.inf
        for unit in members:
            assert unit.scores is not None
            order = np.argsort(unit.scores, kind="stable")
            wanted = int((unit.scores <= threshold).sum())
            wanted = min(wanted, math.floor(MAX_UNIT_FRACTION * unit.size), unit.size - 1)
            keep = _keep_count(unit.size, wanted, round_to if kind != "heads" else None)
            plan[unit.name] = sorted(int(i) for i in order[: unit.size - keep])
    return plan


@dataclass
class Solution:
    fraction: float
    plan: dict[str, list[int]]
    module: Any
    value: float  # the target quantity after pruning
    reduction: float  # 1 - value / value before this step
    probes: int


def solve(
    units: list[Unit],
    goal: float,
    before: float,
    prune: Callable[[dict[str, list[int]]], Any],
    metric: Callable[[Any], float],
    *,
    ranking: str,
    round_to: int | None,
    exact: bool,
    probes: int = 10,
    out_of_time: Callable[[], bool] = lambda: False,
) -> Solution:
    """The smallest fraction whose pruned model reduces ``metric`` by at least ``goal`` (bisection).

    ``exact`` means the metric is the unit count itself, so the fraction is the goal."""
    if exact:
        plan = plan_for(units, goal, ranking, round_to)
        module = prune(plan)
        value = metric(module)
        return Solution(goal, plan, module, value, 1 - value / before, 1)
    count = 0

    def attempt(fraction: float) -> Solution:
        nonlocal count
        count += 1
        plan = plan_for(units, fraction, ranking, round_to)
        module = prune(plan)
        value = metric(module)
        return Solution(fraction, plan, module, value, 1 - value / before, count)

    low, high = 0.0, MAX_UNIT_FRACTION
    best = attempt(high)
    if best.reduction < goal:
        raise TechniqueError(
            f"Pruning can remove at most {best.reduction:.1%} here (each prunable layer keeps at least "
            f"{1 - MAX_UNIT_FRACTION:.0%} and protected layers are kept), short of the {goal:.1%} asked; "
            "lower the ratio or protect fewer layers."
        )
    for _ in range(probes - 1):
        if out_of_time():
            break
        middle = round((low + high) / 2, 4)
        found = attempt(middle)
        if found.reduction >= goal:
            high, best = middle, found
        else:
            low = middle
        if high - low < 0.01:
            break
    best.probes = count
    return best


__all__ = ["MAX_UNIT_FRACTION", "TARGETS", "Solution", "plan_for", "solve"]
