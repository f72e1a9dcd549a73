"""NAS over encoder students of a transformer teacher, each distilled from it, with synchronous
successive halving: every candidate trains a short first rung, the best 1/factor are *continued
from their checkpoint* to the next rung, and so on.

- Proposals: the same two-objective NSGA-II study as the CNN/MLP search (maximize validation mean
  cosine, minimize measured p90), the budget as a constraint.
- Measured: each proposed student is built (``encoder.build_encoder``: teacher layers, narrowed)
  and measured whole at batch 1 on ONNX Runtime before any training; above the budget it is
  ``over_budget``. The per-part latency table is not used here: exporting and timing a whole
  student takes seconds where training it takes minutes, so every candidate is measured. It is
  timed in interleaved rounds with the teacher, and its figure is its ratio to the teacher in those
  rounds times the teacher's figure at the start of the search: load that comes and goes on a shared
  machine (a burst during one candidate's timing) then changes both sides of the ratio alike, instead
  of admitting or rejecting that candidate by chance. Students of one shape (depth, widths) are
  timed once and share the figure: which teacher layers they copy does not change their graph.
- Training: the distillation technique's ``Trainer`` and ``EmbeddingObjective`` (mean-pooled
  embeddings, cosine + MSE), token embeddings frozen, dropout off; the teacher's targets are
  computed once and shared by every candidate. The learning-rate schedule is planned for the
  last rung, so a continued candidate trains exactly as one run would.
- Why synchronous: Optuna cannot suspend and resume a trial, so its SuccessiveHalvingPruner is
  asynchronous (the first trials at a rung are promoted with nothing to compare against). Here a
  candidate *is* suspended (its checkpoint) and every candidate of a rung is compared with all of
  them. A stopped candidate is told to Optuna as PRUNED and recorded ``pruned``, never failed.
- Anytime: at ``max_minutes`` the candidate in training is cut (keeping its best weights); the
  best candidate trained so far is the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from torch import nn

from compactai.errors import ParameterError
from compactai.measure import MeasureConfig, interleaved_latency
from compactai.models.handle import ModelHandle
from compactai.tasks import EmbeddingFidelity, Task
from compactai.techniques.distill.objectives import EmbeddingObjective
from compactai.techniques.distill.technique import Distill, validation_scorer
from compactai.techniques.distill.trainer import TrainConfig, Trainer
from compactai.techniques.nas.encoder import build_encoder, teacher_shape
from compactai.techniques.nas.search import (
    FAILED,
    OK,
    OVER_BUDGET,
    PRUNED,
    STOPPED,
    Candidate,
    NasConfig,
    NasOutcome,
    propose_distinct,
    rungs_of,
)

log = logging.getLogger(__name__)
NOT_TRAINED = "not_trained"  # measured within the budget, but the time limit came before its turn


@dataclass
class _Member:
    candidate: Candidate
    trial: optuna.Trial
    rung_trial: optuna.Trial
    model: nn.Module
    work_dir: Path


@dataclass
class Reference:
    """The teacher as every candidate's timing reference: its ONNX form and batch-1 p50/p90 (ms),
    measured at the start of the search."""

    handle: ModelHandle
    p50_ms: float
    p90_ms: float

    @classmethod
    def measure(cls, teacher: ModelHandle, threads: int, queries: int, rounds: int = 3) -> Reference:
        handle = teacher.to_onnx(parity=False)
        row = interleaved_latency([handle], MeasureConfig(min_queries=queries, min_seconds=0.5, threads=threads),
                                  rounds)[0]
        return cls(handle, row["latency_p50_ms"], row["latency_p90_ms"])


# A candidate is timed in CANDIDATE_ROUNDS rounds of CANDIDATE_SECONDS each, interleaved with the
# reference. Three rounds of 0.2 s let noise decide on MiniLM: two students of one shape (4 layers,
# FFN 1024, different teacher layers) measured 4.02 and 4.52 ms p90, and the first was admitted
# under a budget it missed by 17-25% when re-measured.
CANDIDATE_ROUNDS = 5
CANDIDATE_SECONDS = 0.4


def shape_key(spec: dict[str, Any]) -> tuple[int, ...]:
    """What a student's latency depends on: its depth and widths, not which teacher layers it copies."""
    return tuple(int(spec[k]) for k in ("layers", "hidden", "heads", "ffn"))


def measure_student(student: nn.Module, teacher: ModelHandle, threads: int, queries: int,
                    reference: Reference | None = None, rounds: int = CANDIDATE_ROUNDS) -> tuple[float, float]:
    """(p50, p90) ms of ``student`` at batch 1 on ONNX Runtime, on the teacher's probe inputs: timed in
    ``rounds`` interleaved with the teacher, and scaled by the teacher's figures in ``reference``
    (measured once at the start), so that a candidate's figure is its speed relative to the teacher."""
    reference = reference or Reference.measure(teacher, threads, queries)
    handle = teacher.derive(module=student.eval(), name="nas-encoder-candidate").to_onnx(parity=False)
    teacher_row, row = interleaved_latency([reference.handle, handle], MeasureConfig(
        min_queries=queries, min_seconds=CANDIDATE_SECONDS, threads=threads), rounds)
    return (row["latency_p50_ms"] / teacher_row["latency_p50_ms"] * reference.p50_ms,
            row["latency_p90_ms"] / teacher_row["latency_p90_ms"] * reference.p90_ms)


def cosine_task(task: Task) -> Task:
    """``task`` scored by mean cosine (the headline figure of the MiniLM bars), not the minimum."""
    if not isinstance(task.metric, EmbeddingFidelity):
        raise ParameterError("The encoder space distils sentence encoders: the task's metric must be embedding "
                             f"fidelity; got {task.metric.name}.")
    return task.scored_by("cosine_mean")


def run_encoder_search(
    space: dict[str, Any],
    teacher: ModelHandle,
    task: Task,
    config: NasConfig,
    work_dir: Path,
    progress: Callable[[str], None] = lambda message: None,
    reference: Reference | None = None,
) -> NasOutcome:
    """Search ``space`` (family ``encoder``) for the student of ``teacher`` with the best validation
    mean cosine within ``config.budget_ms``; checkpoints and the teacher's targets go in ``work_dir``.
    ``reference``: the teacher's figures a relative budget was made from (measured here without it)."""
    config.check()
    started = time.monotonic()
    deadline = None if config.max_minutes is None else started + config.max_minutes * 60
    if space["family"] != "encoder":
        raise ParameterError(f"run_encoder_search searches the encoder space; got the {space['family']} space.")
    shape = teacher_shape(teacher)
    wrong = [h for h in space["choices"]["hidden"] if h != shape["hidden"]]
    if wrong:
        raise ParameterError(f"The encoder space's 'hidden' sizes {wrong} differ from the teacher's {shape['hidden']}: "
                             f"students keep the teacher's token embeddings; use \"hidden\": [{shape['hidden']}].")
    assert teacher.module is not None
    scored = cosine_task(task)
    train = task.split("train")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=optuna.samplers.NSGAIISampler(population_size=8, seed=config.train.seed))
    fidelity = optuna.create_study(direction="maximize")  # the per-rung values, one trial per trained candidate
    rungs = rungs_of(config)
    outcome = NasOutcome([], "max_trials", rungs, {"candidates": 0, "spearman": None, "mean_relative_error": None,
                                                   "note": "not used for the encoder space: every candidate is "
                                                           "measured whole before it is trained, interleaved "
                                                           "with the teacher"}, 0.0)
    cohort = _propose(space, teacher, shape, config, study, fidelity, deadline, work_dir, outcome, progress, reference)
    objective = EmbeddingObjective(teacher.module, teacher.input_names, "cosine+mse")
    targets = work_dir / f"teacher-targets-{Distill.targets_key(teacher, objective, train)}.safetensors"
    scorer = validation_scorer(scored, teacher.input_names)
    alive = cohort
    for number, rung in enumerate(rungs):
        for member in alive:
            if deadline is not None and time.monotonic() >= deadline:
                break
            _train_to(member, rung, objective, scorer, train, config, targets, deadline, progress)
        finished = [m for m in alive if m.candidate.epochs_run >= rung and m.candidate.validation is not None]
        if len(finished) < len(alive) or number == len(rungs) - 1:
            outcome.stopped_by = "time" if len(finished) < len(alive) else outcome.stopped_by
            break
        ranked = sorted(finished, key=lambda m: -(m.candidate.validation or 0.0))
        alive = ranked[:max(1, len(ranked) // config.reduction_factor)]
        for member in ranked[len(alive):]:
            member.candidate.status = PRUNED
            fidelity.tell(member.rung_trial, state=optuna.trial.TrialState.PRUNED)
            study.tell(member.trial, state=optuna.trial.TrialState.PRUNED)
            shutil.rmtree(member.work_dir, ignore_errors=True)  # never continued: its checkpoint is not needed
        progress(f"rung {rung} epochs: continuing {[m.candidate.number for m in alive]}, "
                 f"pruned {[m.candidate.number for m in ranked[len(alive):]]}")
    for member in cohort:
        candidate = member.candidate
        if candidate.status == PRUNED:
            continue
        if candidate.validation is None:
            candidate.status = NOT_TRAINED
            fidelity.tell(member.rung_trial, state=optuna.trial.TrialState.PRUNED)
            study.tell(member.trial, state=optuna.trial.TrialState.PRUNED)
            continue
        candidate.status = OK if candidate.epochs_run >= rungs[-1] else STOPPED
        outcome.models[candidate.number] = member.model
        fidelity.tell(member.rung_trial, candidate.validation)
        study.tell(member.trial, [candidate.validation, candidate.latency_p90_ms or 0.0])
    outcome.seconds = round(time.monotonic() - started, 1)
    return outcome


def _propose(space: dict[str, Any], teacher: ModelHandle, shape: dict[str, int], config: NasConfig,
             study: optuna.Study, fidelity: optuna.Study, deadline: float | None, work_dir: Path,
             outcome: NasOutcome, progress: Callable[[str], None], reference: Reference | None) -> list[_Member]:
    """Propose up to ``max_trials`` distinct students, build and measure each; the ones within the
    budget form the cohort that trains at the first rung."""
    cohort: list[_Member] = []
    task_shape = {"input": {"names": list(teacher.input_names)}, "teacher": shape}
    if reference is None:
        progress("timing the teacher: every candidate is timed interleaved with it")
        reference = Reference.measure(teacher, config.threads, max(config.measure_queries, 200))
    outcome.predictor["teacher_reference_ms"] = {"p50": round(reference.p50_ms, 4), "p90": round(reference.p90_ms, 4)}
    timed: dict[tuple[int, ...], tuple[float, float]] = {}  # one figure per shape: same shape, same decision
    for trial, candidate in propose_distinct(study, space, task_shape, config.max_trials, outcome, deadline):
        spec = candidate.spec
        began = time.monotonic()
        try:
            model = build_encoder(spec, teacher, seed=config.train.seed)
            candidate.params = sum(p.numel() for p in model.parameters())
            if shape_key(spec) not in timed:
                timed[shape_key(spec)] = measure_student(model, teacher, config.threads, config.measure_queries,
                                                         reference)
            candidate.latency_p50_ms, candidate.latency_p90_ms = timed[shape_key(spec)]
        except Exception as exc:  # noqa: BLE001 (one student that cannot be built or exported must not end the search; it is recorded as failed)
            log.warning("NAS encoder candidate %d failed: %s", candidate.number, exc)
            candidate.status, candidate.error = FAILED, f"{type(exc).__name__}: {exc}"[:500]
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            continue
        finally:
            candidate.seconds = round(time.monotonic() - began, 2)
        trial.set_constraint("budget_violation_ms", candidate.latency_p90_ms - config.budget_ms)
        if candidate.latency_p90_ms > config.budget_ms:
            candidate.status = OVER_BUDGET
            study.tell(trial, [0.0, candidate.latency_p90_ms])
        else:
            for module in model.modules():  # token tables are most of a small encoder's weights: kept as taught
                if isinstance(module, nn.Embedding):
                    module.weight.requires_grad_(False)
            cohort.append(_Member(candidate, trial, fidelity.ask(), model,
                                  work_dir / f"candidate-{candidate.number}-{_run_key(spec, teacher, config)}"))
        progress(f"candidate {candidate.number}: {candidate.status} {spec['layers']} layers ({spec['init']}) "
                 f"{spec['heads']} heads ffn {spec['ffn']}: p90 {candidate.latency_p90_ms:.3f} ms")
    return cohort


def _run_key(spec: dict[str, Any], teacher: ModelHandle, config: NasConfig) -> str:
    """A candidate's checkpoints are resumed only by the same student, teacher and training settings: an
    earlier run into the same output directory (other epochs, another seed) must not be continued."""
    text = json.dumps({"spec": spec, "teacher": teacher.fingerprint(), "train": asdict(config.train)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _train_to(member: _Member, rung: int, objective: EmbeddingObjective, scorer: Any, train: Any,
              config: NasConfig, targets: Path, deadline: float | None, progress: Callable[[str], None]) -> None:
    """Train ``member`` (continuing from its checkpoint) to the end of epoch ``rung``."""
    candidate = member.candidate
    settings = config.train
    train_config = TrainConfig(epochs=settings.max_epochs, lr=settings.lr, batch_size=settings.batch_size,
                               weight_decay=1e-4, patience=settings.max_epochs + 1, seed=settings.seed,
                               checkpoint_every=10**9, resume=True, dropout=False, final_weights="best",
                               stop_epoch=rung)
    began = time.monotonic()
    # with stop_epoch the deadline cuts the run but does not shorten its schedule: a candidate's schedule
    # is the same whichever rung it is continued to
    trainer = Trainer(member.model, objective, train, train_config, scorer, member.work_dir,
                      lambda message: progress(f"candidate {candidate.number}: {message}"), deadline,
                      targets_file=targets)
    result = trainer.run()
    candidate.seconds = round(candidate.seconds + time.monotonic() - began, 2)
    candidate.epochs_run, candidate.validation, candidate.history = result.epochs_run, result.best_metric, result.history
    if result.best_metric is not None:
        member.rung_trial.report(result.best_metric, rung)


__all__ = ["NOT_TRAINED", "Reference", "cosine_task", "measure_student", "run_encoder_search", "shape_key"]
