"""Selection: the Pareto front, the chosen candidate within budget, or the closest misses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compactai.budget import Budget, Check
from compactai.search.trial import TrialResult


def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True if ``a`` is no worse than ``b`` in quality (higher), p90 latency and size (lower), and better in one."""
    qa, qb = a.get("quality", float("-inf")), b.get("quality", float("-inf"))
    la, lb = a.get("latency_p90_ms", float("inf")), b.get("latency_p90_ms", float("inf"))
    sa, sb = a.get("size_mb") or float("inf"), b.get("size_mb") or float("inf")
    no_worse = qa >= qb and la <= lb and sa <= sb
    better = qa > qb or la < lb or sa < sb
    return no_worse and better


def pareto_front(results: list[TrialResult]) -> list[TrialResult]:
    ok = [r for r in results if r.status == "ok"]
    return [r for r in ok if not any(dominates(o.figures, r.figures) for o in ok if o is not r)]


@dataclass
class Selection:
    chosen: TrialResult | None
    front: list[TrialResult]
    closest: list[TrialResult]
    failed_checks: list[Check]  # for the closest candidate when nothing fits

    def explain(self, budget: Budget) -> str:
        if self.chosen is not None:
            return f"trial {self.chosen.number} meets every constraint of the budget ({budget})"
        if not self.closest:
            return "no trial finished successfully, so no candidate could be compared with the budget"
        reasons = "; ".join(c.describe() for c in self.failed_checks if not c.ok)
        return f"no candidate meets the budget ({budget}); the closest, trial {self.closest[0].number}: {reasons}"


def select(results: list[TrialResult], budget: Budget, closest_count: int = 3) -> Selection:
    """Best quality within budget (ties broken by p90 latency, then size); else the closest misses."""
    ok = [r for r in results if r.status == "ok"]
    feasible = [r for r in ok if budget.satisfied(r.figures)]
    front = pareto_front(results)
    if feasible:
        chosen = max(feasible, key=lambda r: (round(r.figures.get("quality", 0.0), 6),
                                              -r.figures.get("latency_p90_ms", 0.0), -(r.figures.get("size_mb") or 0.0)))
        return Selection(chosen, front, [], [])
    # a model that lost the quality it must keep is no near miss however small it is: candidates
    # that keep it come first (a collapsed pruned CNN once ranked closest on size and latency)
    closest = sorted(ok, key=lambda r: (budget.misses_quality(r.figures), budget.violation(r.figures),
                                        -r.figures.get("quality", 0.0)))[:closest_count]
    checks = budget.check(closest[0].figures) if closest else []
    return Selection(None, front, closest, checks)
