"""The budget-driven search: Optuna ask/tell over pipelines, every trial measured on the runtime.

Objectives: maximize quality, minimize measured p90 latency, minimize size. Budget
constraints go to the sampler (TPE with ``constraints_func``). The study lives in SQLite in
the output directory (or any RDB URL), so ``resume`` continues it without repeating finished
trials; each trial's full result is stored in its user attributes.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compactai.budget import Budget
from compactai.errors import BadInputError, ParameterError
from compactai.measure import MeasureConfig
from compactai.models.handle import ModelHandle
from compactai.results import describe
from compactai.search.deployment import NetworkSpec
from compactai.search.executors import Executor, make_executor
from compactai.search.fidelity import FidelityConfig, Schedule, rungs_for
from compactai.search.space import SearchSpace, recipe_key
from compactai.search.trial import TrialResult
from compactai.tasks import Task

log = logging.getLogger(__name__)
STUDY_NAME = "compactai"
RESULT_ATTR = "compactai_result"


@dataclass
class SearchConfig:
    max_trials: int = 20
    max_minutes: float | None = None
    seed: int = 0
    executor: str = "local"
    ray_address: str | None = None
    storage: str | None = None  # default: sqlite in the output directory
    resume: bool = False
    selection_split: str = "validation"
    measure: MeasureConfig = field(default_factory=lambda: MeasureConfig(
        min_queries=100, min_seconds=0.5, warmup=10, throughput_min_batches=5, memory=False))
    enqueue_singles: bool = True
    remeasure_rounds: int = 3  # interleaved re-measurement of the contenders before selection (remeasure.py)
    network: NetworkSpec | None = None  # when given, results say where to split the chosen model (deployment.py)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)  # training trials in rungs (fidelity.py)

    def check(self) -> None:
        """Raise ParameterError for limits that cannot mean anything (called before any work starts):
        0 or negative trials or minutes used to end in "relax the budget" after a wasted baseline."""
        if isinstance(self.max_trials, bool) or not isinstance(self.max_trials, int) or not 1 <= self.max_trials <= 10_000:
            raise ParameterError(f"--max-trials must be a whole number from 1 to 10000; got {self.max_trials}.")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ParameterError(f"--max-minutes must be a positive number of minutes; got {self.max_minutes}. "
                                 "Omit it for no time limit.")
        if not 0 <= self.remeasure_rounds <= 20:
            raise ParameterError(f"--remeasure-rounds must be from 0 to 20; got {self.remeasure_rounds}.")
        self.measure.check()
        self.fidelity.check()
        if self.network is not None:
            self.network.check()


@dataclass
class SearchOutcome:
    trials: list[TrialResult]
    interrupted: bool
    stopped_by: str  # "max_trials" | "time" | "interrupt" | "exhausted" (every recipe of the space has run)
    storage: str


def storage_url(out_dir: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"


def check_study(out_dir: Path, config: SearchConfig) -> None:
    """Refuse to silently mix with an old study, or to resume nothing (before any work starts)."""
    url = storage_url(out_dir, config.storage)
    exists = (out_dir / "study.db").exists() if config.storage is None else _study_exists(url)
    if exists and not config.resume:
        raise BadInputError(
            f"{out_dir} already holds a search study; pass --resume to continue it, or choose a new -o directory."
        )
    if config.resume and not exists:
        raise BadInputError(f"Nothing to resume in {out_dir}: no study found. Run without --resume first.")


def open_study(out_dir: Path, config: SearchConfig) -> Any:
    """Create the study, or load it when resuming. Budget violations reach the sampler as
    constraints (``trial.set_constraint``), so TPE learns where the feasible region is."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_study(out_dir, config)
    url = storage_url(out_dir, config.storage)
    sampler = optuna.samplers.TPESampler(seed=config.seed, multivariate=True, n_startup_trials=6)
    return optuna.create_study(study_name=STUDY_NAME, storage=url, load_if_exists=True, sampler=sampler,
                               directions=["maximize", "minimize", "minimize"])


def _study_exists(url: str) -> bool:
    import optuna

    try:
        return any(s.study_name == STUDY_NAME for s in optuna.get_all_study_summaries(storage=url))
    except Exception:  # noqa: BLE001 (best effort: any failure means "not available")
        return False


REPEAT_ATTR = "repeat_of"  # set on a trial whose recipe an earlier trial already ran
MAX_REPEATS_IN_A_ROW = 10  # the sampler proposing only known recipes: the space is exhausted


def finished_results(study: Any) -> list[TrialResult]:
    """Results of every finished trial in the study (from its stored user attributes), one per
    recipe: a repeat the sampler proposed is kept in the study, not among the results. A trial
    failed without a stored result was abandoned by a stopped run (see ``_fail_abandoned``)."""
    from optuna.trial import TrialState

    results = []
    for trial in study.get_trials(deepcopy=False):
        if not trial.state.is_finished() or REPEAT_ATTR in trial.user_attrs:
            continue
        data = trial.user_attrs.get(RESULT_ATTR)
        if data:
            results.append(TrialResult.from_dict(json.loads(data) if isinstance(data, str) else data))
        elif trial.state == TrialState.FAIL:
            results.append(TrialResult(
                trial.number, [], "failed",
                error=f"interrupted: the run was stopped during this trial (parameters {trial.params})"))
    return sorted(results, key=lambda r: r.number)


def _fail_abandoned(study: Any) -> int:
    """Trials left RUNNING by a killed process are marked failed (they are not re-run)."""
    from optuna.trial import TrialState

    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in running:
        study.tell(trial.number, state=TrialState.FAIL)
    return len(running)


def objective_values(result: TrialResult) -> list[float]:
    f = result.figures
    return [float(f.get("quality", 0.0)), float(f.get("latency_p90_ms", 1e9)), float(f.get("size_mb") or 1e9)]


def run_search(
    handle: ModelHandle,
    task: Task,
    budget: Budget,
    space: SearchSpace,
    out_dir: Path,
    config: SearchConfig,
    *,
    selection_baseline: float | None = None,
    on_trial: Callable[[TrialResult], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> SearchOutcome:
    """Run trials until max_trials (counting resumed ones), the time limit or Ctrl-C."""
    import optuna
    from optuna.trial import FixedTrial

    study = open_study(out_dir, config)
    abandoned = _fail_abandoned(study)
    if abandoned:
        log.warning("marked %d trial(s) interrupted in the previous run as failed", abandoned)
    say = progress or (lambda message: None)
    if config.enqueue_singles and not study.trials:
        for params in space.seed_trials():
            study.enqueue_trial(params, skip_if_exists=True)
    deadline = None if config.max_minutes is None else time.monotonic() + config.max_minutes * 60
    executor = make_executor(config, handle, task, budget, out_dir, selection_baseline=selection_baseline)
    seen: dict[str, TrialResult] = {json.dumps(r.recipe, sort_keys=True): r for r in finished_results(study)}
    schedule = Schedule.from_results(config.fidelity, budget, finished_results(study))
    # a finite space is listed once: the run stops when every recipe in it has run, and a repeat the
    # sampler proposes is followed by a recipe not run yet (instead of guessing exhaustion from repeats)
    listed = space.enumerate()
    every = {} if listed is None else {recipe_key(space.sample(FixedTrial(p))): p for p in listed}
    tried = {recipe_key(r.recipe) for r in finished_results(study)}  # ok or failed: neither is run again
    enqueued: set[str] = set()  # unseen recipes already queued (not again while they wait)
    stopped_by, interrupted, repeats_in_a_row = "max_trials", False, 0
    previous_handler = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            # repeats of a finished recipe cost nothing and do not count: max_trials distinct recipes
            done = len([t for t in study.get_trials(deepcopy=False)
                        if t.state.is_finished() and REPEAT_ATTR not in t.user_attrs])
            if done >= config.max_trials:
                stopped_by = "max_trials"
                break
            if every and set(every) <= tried:
                stopped_by = "exhausted"
                say(f"every candidate the search space allows has run ({len(every)})")
                break
            # also for a listed space: a recipe of a killed run is left RUNNING in the study, never
            # finished, so it can stay unseen while the sampler proposes only repeats
            if repeats_in_a_row >= MAX_REPEATS_IN_A_ROW:
                stopped_by = "exhausted"
                say(f"the sampler proposed only recipes already run {MAX_REPEATS_IN_A_ROW} times in a row: "
                    "the search space looks exhausted")
                break
            if deadline is not None and time.monotonic() >= deadline:
                stopped_by = "time"
                break
            batch = min(executor.parallel, config.max_trials - done)
            asked = []
            for _ in range(batch):
                trial = study.ask()
                recipe = space.sample(trial)
                asked.append((trial, recipe))
                if json.dumps(recipe, sort_keys=True) not in seen:
                    say(f"trial {trial.number} ({done + len(asked)} of at most {config.max_trials}): {describe(recipe)}")
            results: dict[int, TrialResult] = {}
            jobs = []
            for trial, recipe in asked:
                key = json.dumps(recipe, sort_keys=True)
                if key in seen:  # identical recipe: tell the sampler the measured result again (content-addressed)
                    previous = seen[key]
                    results[trial.number] = TrialResult.from_dict(
                        {**previous.to_dict(), "number": trial.number, "seconds": 0.0, "cached_steps": len(recipe)})
                    trial.set_user_attr(REPEAT_ATTR, previous.number)
                    repeats_in_a_row += 1
                    unseen = next(((k, p) for k, p in every.items() if k not in tried and k not in enqueued), None)
                    if unseen is not None:
                        # not skip_if_exists: Optuna would skip a recipe whose trial a killed run left RUNNING
                        enqueued.add(unseen[0])
                        study.enqueue_trial(unseen[1])
                else:
                    jobs.append((trial.number, recipe))
                    tried.add(key)
                    repeats_in_a_row = 0
            results.update(run_scheduled(executor, jobs, deadline, schedule, say))
            for trial, recipe in asked:
                result = results[trial.number]
                trial.set_user_attr(RESULT_ATTR, json.dumps(result.to_dict()))
                trial.set_user_attr("recipe", describe(recipe))
                if result.status == "ok":
                    seen.setdefault(json.dumps(recipe, sort_keys=True), result)
                    trial.set_constraint("budget_violation", result.violation)
                    study.tell(trial, objective_values(result))
                elif result.status == "pruned":  # stopped at a rung of the schedule: not a failure
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                else:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                if on_trial is not None and REPEAT_ATTR not in trial.user_attrs:
                    on_trial(result)
    except KeyboardInterrupt:
        interrupted, stopped_by = True, "interrupt"
        _fail_abandoned(study)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        executor.close()
    return SearchOutcome(finished_results(study), interrupted, stopped_by, storage_url(out_dir, config.storage))


def run_scheduled(executor: Executor, jobs: list[tuple[int, list[dict[str, Any]]]], deadline: float | None,
                  schedule: Schedule, say: Callable[[str], None]) -> dict[int, TrialResult]:
    """Run ``jobs`` (trial number, recipe); a recipe with a training step runs rung by rung, each
    rung continuing from the previous one's checkpoint while ``schedule`` promotes it (fidelity.py)."""
    plans = {number: rungs_for(recipe, schedule.config) for number, recipe in jobs}
    histories: dict[int, list[dict[str, Any]]] = {number: [] for number, _ in jobs}
    results: dict[int, TrialResult] = {}
    active = [(number, recipe, 0) for number, recipe in jobs]
    while active:
        ran = {r.number: r for r in executor.run_many([(n, recipe, plans[n][i]) for n, recipe, i in active], deadline)}
        continuing = []
        for number, recipe, index in active:
            result, rungs = ran[number], plans[number]
            if rungs == [None]:
                results[number] = result
                continue
            rung = rungs[index]
            assert rung is not None
            entry = schedule.record(result, rung)
            history = histories[number]
            history.append(entry)
            late = deadline is not None and time.monotonic() >= deadline
            last = index == len(rungs) - 1
            if result.status == "ok" and not last and not late and schedule.promote(entry):
                entry["decision"] = f"continued to {rungs[index + 1]} epochs"
                say(f"trial {number}: quality {entry['quality']:.4g} after {rung} epochs: {entry['decision']}")
                continuing.append((number, recipe, index + 1))
                continue
            decision = "failed" if result.status != "ok" else (
                "completed" if last else "time" if late else "pruned")
            entry["decision"] = decision
            if decision == "pruned":
                result.status = "pruned"
                say(f"trial {number}: quality {entry['quality']} after {rung} epochs: stopped (pruned)")
            result.seconds = round(sum(e["seconds"] for e in history), 2)
            result.fidelity = {"rungs": rungs, "epochs": rung, "history": history, "decision": decision}
            results[number] = result
        active = continuing
    return results
