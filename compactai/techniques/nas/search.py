"""Hardware-aware NAS: Optuna proposes architectures, the latency predictor screens them, survivors
are measured whole on ONNX Runtime and trained under a multi-fidelity schedule.

- Proposals: a two-objective study (maximize validation accuracy, minimize measured p90 latency)
  with NSGA-II; the latency budget is a constraint (``trial.set_constraint``), so infeasible
  architectures rank below feasible ones.
- Screening: a candidate whose predicted latency exceeds ``reject_margin`` x the budget is
  *rejected* before it is exported or trained; a few rejected ones are measured anyway
  (``audit``) so the predictor's accuracy is known over the whole range, not only below the cut.
- Fidelity: Optuna does not take intermediate values on multi-objective studies, so the epochs
  of each trained candidate are reported to a companion single-objective study whose
  ``SuccessiveHalvingPruner`` (resource = epochs) decides at each rung whether it continues.
  A candidate the pruner stops is recorded as ``pruned`` (Optuna state PRUNED), never as failed.
- Anytime: the search stops at ``max_trials`` or ``max_minutes`` (a candidate in training is cut
  at the deadline and kept with its best weights) and returns every record so far.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
import torch

from compactai.errors import ParameterError
from compactai.measure import make_runner, measure_latency
from compactai.models.load import load_model
from compactai.tasks import Task
from compactai.techniques.nas._train import TeacherViews, TrainSettings, train_candidate
from compactai.techniques.nas.build import build_model
from compactai.techniques.nas.predictor import LatencyTable, predictor_accuracy
from compactai.techniques.nas.space import sample_spec, spec_key

log = logging.getLogger(__name__)
OK, PRUNED, REJECTED, OVER_BUDGET, STOPPED, FAILED = "ok", "pruned", "rejected", "over_budget", "stopped_by_time", "failed"


@dataclass
class NasConfig:
    budget_ms: float  # p90 batch-1 latency on ONNX Runtime
    max_trials: int = 30
    max_minutes: float | None = None
    min_epochs: int = 2  # the first rung
    reduction_factor: int = 3
    reject_margin: float = 1.25
    audit: int = 5
    threads: int = 1
    measure_queries: int = 100
    train: TrainSettings = field(default_factory=TrainSettings)

    def check(self) -> None:
        if not (math.isfinite(self.budget_ms) and self.budget_ms > 0):
            raise ParameterError(f"The latency budget must be a positive number of milliseconds; got {self.budget_ms}.")
        if isinstance(self.max_trials, bool) or not 1 <= self.max_trials <= 10_000:
            raise ParameterError(f"--max-trials must be a whole number from 1 to 10000; got {self.max_trials}.")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ParameterError(f"--max-minutes must be a positive number of minutes; got {self.max_minutes}.")
        if not 1 <= self.min_epochs <= self.train.max_epochs:
            raise ParameterError(f"The first rung ({self.min_epochs} epochs) must be from 1 to --epochs "
                                 f"({self.train.max_epochs}).")
        if not (math.isfinite(self.train.lr) and 0 < self.train.lr < 1):
            raise ParameterError(f"--lr must be a number in (0, 1); got {self.train.lr}.")
        if self.reduction_factor < 2:
            raise ParameterError(f"The reduction factor must be at least 2; got {self.reduction_factor}.")


@dataclass
class Candidate:
    number: int
    spec: dict[str, Any]
    status: str = OK
    predicted_ms: float | None = None
    latency_p50_ms: float | None = None
    latency_p90_ms: float | None = None
    params: int | None = None
    epochs_run: float = 0.0
    validation: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class NasOutcome:
    candidates: list[Candidate]
    stopped_by: str  # max_trials | time | exhausted
    rungs: list[int]
    predictor: dict[str, Any]
    seconds: float
    models: dict[int, torch.nn.Module] = field(default_factory=dict, repr=False)

    def eligible(self, budget_ms: float) -> list[Candidate]:
        """Trained candidates whose measured p90 fits the budget, best validation first (then faster)."""
        fits = [c for c in self.candidates if c.status in (OK, STOPPED) and c.validation is not None
                and c.latency_p90_ms is not None and c.latency_p90_ms <= budget_ms]
        return sorted(fits, key=lambda c: (-(c.validation or 0.0), c.latency_p90_ms or 0.0))

    def fidelity_schedule(self) -> list[dict[str, int]]:
        """How many candidates trained to at least each rung (epochs)."""
        trained = [c for c in self.candidates if c.history]
        return [{"epochs": rung, "candidates": sum(1 for c in trained if c.epochs_run >= rung)} for rung in self.rungs]

    def counts(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for candidate in self.candidates:
            found[candidate.status] = found.get(candidate.status, 0) + 1
        return found


def rungs_of(config: NasConfig) -> list[int]:
    """Epoch counts at which the pruner decides: min_epochs x factor^k, up to max_epochs."""
    rungs, epochs = [], config.min_epochs
    while epochs < config.train.max_epochs:
        rungs.append(epochs)
        epochs *= config.reduction_factor
    return [*rungs, config.train.max_epochs]


def measure_spec_latency(model: torch.nn.Module, example: torch.Tensor, input_name: str, threads: int,
                         queries: int) -> tuple[float, float]:
    """(p50, p90) ms of ``model`` at batch 1 on ONNX Runtime (weights do not change dense fp32 latency,
    so the untrained model is measured before any training is spent on it)."""
    handle = load_model(model.eval(), {input_name: example}, name="nas-candidate", output_names=["logits"])
    runner = make_runner(handle.to_onnx(parity=False), "onnxruntime", threads)
    stats = measure_latency(runner, {input_name: example.numpy()}, min_queries=queries, min_seconds=0.2, warmup=10)
    return stats.p50_ms, stats.p90_ms


def run_search(
    space: dict[str, Any],
    task: Task,
    config: NasConfig,
    table: LatencyTable,
    teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> NasOutcome:
    """Search ``space`` for the best-validation architecture within ``config.budget_ms``."""
    config.check()
    started = time.monotonic()
    deadline = None if config.max_minutes is None else started + config.max_minutes * 60
    train, validation = task.split("train"), task.split("validation")
    input_name = next(iter(train.inputs))
    example = torch.from_numpy(validation.inputs[input_name][:1])
    shape = {"input": {"name": input_name, "shape": list(example.shape[1:])},
             "classes": _classes(train, validation)}
    views = TeacherViews(teacher, torch.from_numpy(train.inputs[input_name])) if teacher is not None else None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(population_size=8, seed=config.train.seed)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    rungs = rungs_of(config)
    pruner = optuna.pruners.SuccessiveHalvingPruner(
        min_resource=config.min_epochs, reduction_factor=config.reduction_factor, min_early_stopping_rate=0)
    fidelity = optuna.create_study(direction="maximize", pruner=pruner)
    outcome = NasOutcome([], "max_trials", rungs, {}, 0.0)
    audited = 0
    for trial, candidate in propose_distinct(study, space, shape, config.max_trials, outcome, deadline):
        began = time.monotonic()
        try:
            _evaluate(candidate, trial, study, fidelity, config, table, example, input_name, train, validation, views,
                      deadline, outcome, audited < config.audit, progress)
            audited += candidate.status == REJECTED and candidate.latency_p90_ms is not None
        except Exception as exc:  # noqa: BLE001 (one architecture that cannot export or train must not end the search; it is recorded as failed)
            log.warning("NAS candidate %d failed: %s", candidate.number, exc)
            candidate.status, candidate.error = FAILED, f"{type(exc).__name__}: {exc}"[:500]
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        candidate.seconds = round(time.monotonic() - began, 2)
        progress(f"candidate {candidate.number}: {candidate.status} predicted {_ms(candidate.predicted_ms)} "
                 f"measured p90 {_ms(candidate.latency_p90_ms)} validation {candidate.validation}")
    measured = [c for c in outcome.candidates if c.latency_p50_ms is not None and c.predicted_ms is not None]
    outcome.predictor = {**predictor_accuracy([c.predicted_ms or 0.0 for c in measured],
                                              [c.latency_p50_ms or 0.0 for c in measured]),
                         "compared_with": "measured p50 (batch 1)", "parts_timed_this_run": table.measured,
                         "table": str(table.path), "reject_margin": config.reject_margin}
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


def propose_distinct(study: optuna.Study, space: dict[str, Any], shape: dict[str, Any], max_trials: int,
                     outcome: NasOutcome, deadline: float | None) -> Iterator[tuple[optuna.trial.Trial, Candidate]]:
    """Ask ``study`` for architectures of ``space`` until ``max_trials`` distinct ones are in
    ``outcome.candidates``; yields each new one with its trial. NSGA-II may propose an architecture
    again (nothing new to learn): a repeat is told PRUNED and skipped, and too many repeats end the
    search as ``exhausted``; the deadline ends it as ``time``."""
    seen: set[str] = set()
    repeats = 0
    while len(outcome.candidates) < max_trials:
        if deadline is not None and time.monotonic() > deadline:
            outcome.stopped_by = "time"
            return
        trial = study.ask()
        spec = sample_spec(space, trial.suggest_categorical, shape)
        if spec_key(spec) in seen:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            repeats += 1
            if repeats > 20 * max_trials:
                outcome.stopped_by = "exhausted"
                return
            continue
        seen.add(spec_key(spec))
        candidate = Candidate(len(outcome.candidates), spec)
        outcome.candidates.append(candidate)
        yield trial, candidate


def _evaluate(candidate: Candidate, trial: optuna.Trial, study: optuna.Study, fidelity: optuna.Study,
              config: NasConfig, table: LatencyTable, example: torch.Tensor, input_name: str, train: Any,
              validation: Any, views: TeacherViews | None, deadline: float | None, outcome: NasOutcome,
              audit: bool, progress: Callable[[str], None]) -> None:
    """Screen, measure and train one candidate, telling both studies what happened."""
    candidate.predicted_ms = round(table.predict(candidate.spec), 4)
    model = build_model(candidate.spec, seed=config.train.seed)
    candidate.params = sum(p.numel() for p in model.parameters())
    trial.set_user_attr("predicted_ms", candidate.predicted_ms)
    if candidate.predicted_ms > config.reject_margin * config.budget_ms:
        candidate.status = REJECTED
        if audit:  # measured only to check the predictor; never trained
            candidate.latency_p50_ms, candidate.latency_p90_ms = measure_spec_latency(
                model, example, input_name, config.threads, config.measure_queries)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    candidate.latency_p50_ms, candidate.latency_p90_ms = measure_spec_latency(
        model, example, input_name, config.threads, config.measure_queries)
    trial.set_constraint("budget_violation_ms", candidate.latency_p90_ms - config.budget_ms)
    if candidate.latency_p90_ms > config.budget_ms:
        candidate.status = OVER_BUDGET
        study.tell(trial, [0.0, candidate.latency_p90_ms])
        return
    rung_trial = fidelity.ask()

    def after_epoch(epoch: int, value: float) -> bool:
        rung_trial.report(value, epoch)
        return rung_trial.should_prune()

    result, pruned = train_candidate(
        model, train, validation, input_name, config.train, views, after_epoch, deadline,
        progress=lambda message: progress(f"candidate {candidate.number}: {message}"))
    candidate.epochs_run, candidate.validation = result.epochs_run, result.best_metric
    candidate.history = result.history
    outcome.models[candidate.number] = model
    if pruned:
        candidate.status = PRUNED
        fidelity.tell(rung_trial, state=optuna.trial.TrialState.PRUNED)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    candidate.status = STOPPED if result.stopped == "time_budget" else OK
    fidelity.tell(rung_trial, result.best_metric or 0.0)
    study.tell(trial, [result.best_metric or 0.0, candidate.latency_p90_ms])


def _classes(*splits: Any) -> int:
    """Output width: the largest label in the splits, plus one."""
    labels = [split.labels for split in splits]
    if any(found is None for found in labels):
        raise ParameterError("NAS trains classifiers: the train and validation splits need labels.")
    return int(max(found.max() for found in labels)) + 1


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


__all__ = [
    "FAILED",
    "OK",
    "OVER_BUDGET",
    "PRUNED",
    "REJECTED",
    "STOPPED",
    "Candidate",
    "NasConfig",
    "NasOutcome",
    "measure_spec_latency",
    "run_search",
    "rungs_of",
]
