"""Multi-fidelity scheduling of the optimizer's training-based trials (successive halving on epochs).

A trial whose recipe has a training step (a technique with a ``fidelity_param``: distillation, NAS,
pruning's fine-tune) does not get its full epochs at once. It trains to the first *rung* (``min_epochs``), is exported,
measured and scored like any trial, and is then either continued from its checkpoint to the next
rung (``min_epochs x factor^k``, up to the step's own epochs) or stopped. Most candidates therefore
cost one short rung, and the promising ones the full schedule: Hyperband's successive halving.

The decision is asynchronous successive halving (ASHA, as Optuna's ``SuccessiveHalvingPruner``):
a result at a rung continues when its quality is among the best 1/factor of every result recorded
at that rung so far (the first ones, with nothing to compare against, continue while they are the
best). Optuna's pruners cannot be used directly: they take intermediate values only on
single-objective studies, and the optimizer's study has three objectives.

Two more rules, because training changes quality and nothing else:
- a candidate whose *speed or size* misses the budget by more than ``SPEED_MARGIN`` is not
  continued (more epochs cannot make it faster), and does not compete at its rung;
- the learning-rate schedule of a continued candidate is planned for its full epochs, so a
  candidate continued to the last rung trains exactly as one uninterrupted run would
  (``TrainConfig.stop_epoch``).

A stopped candidate is recorded ``pruned`` with its rung's figures (told to Optuna as PRUNED), not
failed. ``schedule_table`` gives how many candidates ran at each rung (the report's fidelity schedule).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from compactai.budget import Budget
from compactai.errors import ParameterError
from compactai.search.trial import TrialResult
from compactai.techniques.base import available_techniques

SPEED_MARGIN = 0.15  # latency/size this far beyond the limit: not continued (measurement noise is smaller)


@dataclass
class FidelityConfig:
    """Successive halving on epochs: rungs at ``min_epochs x reduction_factor^k``."""

    enabled: bool = True
    min_epochs: int = 1
    reduction_factor: int = 3

    def check(self) -> None:
        if isinstance(self.min_epochs, bool) or not isinstance(self.min_epochs, int) or self.min_epochs < 1:
            raise ParameterError(f"--min-epochs (the first rung) must be a whole number of at least 1; "
                                 f"got {self.min_epochs}.")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) \
                or self.reduction_factor < 2:
            raise ParameterError(f"--reduction-factor must be a whole number of at least 2; got {self.reduction_factor}.")


def training_epochs(recipe: list[dict[str, Any]]) -> int | None:
    """The largest epoch count of the recipe's training steps, or None when it trains nothing."""
    registry = available_techniques()
    epochs = []
    for step in recipe:
        cls = registry.get(step["technique"])
        if cls is not None and cls.fidelity_param is not None:
            value = step["params"].get(cls.fidelity_param, cls.space[cls.fidelity_param].default)
            epochs.append(int(value))
    return max(epochs) if epochs else None


def rungs_for(recipe: list[dict[str, Any]], config: FidelityConfig) -> list[int | None]:
    """The stop epochs a trial of ``recipe`` runs at, in order; ``[None]``: one run, no schedule."""
    total = training_epochs(recipe)
    if total is None or not config.enabled or total <= config.min_epochs:
        return [None]
    rungs, epochs = [], config.min_epochs
    while epochs < total:
        rungs.append(epochs)
        epochs *= config.reduction_factor
    return [*rungs, total]


def speed_ok(budget: Budget, figures: dict[str, Any]) -> bool:
    """Every non-quality limit met, or missed by at most SPEED_MARGIN (training cannot change these)."""
    return all(check.ok or (check.actual is not None and check.slack >= -SPEED_MARGIN)
               for check in budget.check(figures) if not check.constraint.key.startswith("quality"))


@dataclass
class Schedule:
    """The values recorded at each rung (epochs -> qualities) and the promotion rule."""

    config: FidelityConfig
    budget: Budget
    values: dict[int, list[float]] = field(default_factory=dict)

    @classmethod
    def from_results(cls, config: FidelityConfig, budget: Budget, results: list[TrialResult]) -> Schedule:
        """A schedule holding the rung values of earlier (e.g. resumed) trials."""
        schedule = cls(config, budget)
        for result in results:
            for entry in (result.fidelity or {}).get("history", []):
                if entry.get("competes"):
                    schedule.values.setdefault(int(entry["epochs"]), []).append(float(entry["quality"]))
        return schedule

    def record(self, result: TrialResult, rung: int) -> dict[str, Any]:
        """Record ``result`` (trained to ``rung`` epochs) and return its history entry."""
        quality = result.figures.get("quality") if result.status == "ok" else None
        competes = quality is not None and speed_ok(self.budget, result.figures)
        if quality is not None and competes:
            self.values.setdefault(rung, []).append(float(quality))
        return {"epochs": rung, "quality": quality, "seconds": round(result.seconds, 2), "competes": competes}

    def promote(self, entry: dict[str, Any]) -> bool:
        """Continue the candidate of history ``entry`` to the next rung? (ASHA: among the best 1/factor.)"""
        if not entry["competes"]:
            return False
        values = sorted(self.values.get(entry["epochs"], []), reverse=True)
        keep = max(1, len(values) // self.config.reduction_factor)
        return float(entry["quality"]) >= values[keep - 1]


def schedule_table(trials: list[TrialResult]) -> list[dict[str, Any]]:
    """How many candidates trained to each rung (epochs), and how many were continued from it."""
    reached: dict[int, int] = {}
    for trial in trials:
        for entry in (trial.fidelity or {}).get("history", []):
            reached[int(entry["epochs"])] = reached.get(int(entry["epochs"]), 0) + 1
    return [{"epochs": epochs, "candidates": count} for epochs, count in sorted(reached.items())]


__all__ = ["SPEED_MARGIN", "FidelityConfig", "Schedule", "rungs_for", "schedule_table", "speed_ok",
           "training_epochs"]
