"""`optimize --runtime NAME|auto`: after the search has chosen its model on ONNX Runtime, the
runtime is chosen by measurement too (docs/optimize.md, "Choosing the runtime").

Candidates: the chosen model on every requested runtime and on ONNX Runtime (the search's result,
measured in the same rounds for reference; a runtime that cannot read the file, e.g. OpenVINO on
ONNX Runtime's QOperator int8 ops, stays a row with its error), plus the float ancestor (see
:func:`float_ancestor`) in fp32 on each other runtime and in that runtime's own int8 (OpenVINO:
NNCF, accuracy-aware against the quality floor). They are built and measured by
:mod:`compactai.search.runtimes` (quality on the validation split, interleaved timing). The
winner is the fastest at batch 1, among the candidates on the requested runtimes, that keeps the
budget's quality floor and the limits measured again here (``RECHECKED``: size and the batch-1
latency and throughput figures, from the same interleaved rounds).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from compactai.bench import is_int8
from compactai.budget import Budget
from compactai.measure import MeasureConfig
from compactai.models.handle import ModelHandle
from compactai.results import describe, model_file
from compactai.search.runtimes import (
    RuntimeCandidate,
    build_candidates,
    candidate_rows,
    measure_candidates,
    winners,
    write_candidate,
)
from compactai.search.trial import TrialResult
from compactai.tasks import Task
from compactai.techniques.base import available_techniques

# budget keys the runtime stage measures again for every candidate (memory, energy and p99 it does not)
RECHECKED = ("size_mb", "latency_p50_ms", "latency_p90_ms", "throughput")


def quality_floor(budget: Budget, selection_baseline: float | None) -> float | None:
    """The budget's quality limits as one absolute floor on the selection split (None: no limit)."""
    floors = []
    for constraint in budget.constraints:
        if constraint.key == "quality":
            floors.append(constraint.value)
        elif constraint.key == "quality_relative" and selection_baseline is not None:
            floors.append(constraint.value * selection_baseline)
    return max(floors, default=None)


def float_ancestor(original: ModelHandle, chosen: TrialResult, trials: list[TrialResult],
                   load: Callable[[TrialResult], ModelHandle]) -> tuple[ModelHandle | None, str, list[dict[str, Any]]]:
    """The float model each runtime quantizes its own way, and how it was found: the chosen model
    itself when its recipe does not end in a quantize step (returned as None: no separate ancestor);
    else the finished trial that ran the chosen recipe without that step (its model is on disk);
    else the original model (re-running the prefix could mean minutes of training). Third: its recipe."""
    recipe = chosen.recipe
    families = {name: technique.family for name, technique in available_techniques().items()}
    if not recipe or families.get(recipe[-1]["technique"]) != "quantize":
        return None, "the chosen model (its recipe does not end with a quantize step)", recipe
    prefix = json.dumps(recipe[:-1], sort_keys=True)
    if not recipe[:-1]:
        return original, "the original model (the chosen recipe is a single quantize step)", []
    for trial in trials:
        if trial.status == "ok" and trial.artifact and Path(trial.artifact).is_file() \
                and json.dumps(trial.recipe, sort_keys=True) == prefix:
            return load(trial), (f"trial {trial.number}: the chosen recipe without its final quantize step "
                                 f"({describe(trial.recipe)})"), trial.recipe
    return original, ("the original model (no finished trial ran the chosen recipe without its final quantize "
                      "step, and re-running it could mean retraining)"), []


def choose_runtime_after_search(
    original: ModelHandle,
    chosen_handle: ModelHandle,
    chosen: TrialResult,
    trials: list[TrialResult],
    load: Callable[[TrialResult], ModelHandle],
    task: Task,
    budget: Budget,
    runtimes: list[str],
    out: Path,
    config: MeasureConfig,
    *,
    selection_baseline: float | None,
    rounds: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] = lambda message: None,
) -> tuple[dict[str, Any], RuntimeCandidate | None, RuntimeCandidate | None]:
    """Measure the runtime candidates and pick the winner; writes a non-ONNX-Runtime winner to
    ``out/<runtime>/``. Returns (the ``runtime_choice`` section of results.json, the winner or
    None, the ONNX Runtime row of the chosen model or None)."""
    floor = quality_floor(budget, selection_baseline)
    ancestor, ancestor_how, ancestor_recipe = float_ancestor(original, chosen, trials, load)
    progress(f"runtime choice on {', '.join(runtimes)}; float ancestor: {ancestor_how}")
    measured = list(dict.fromkeys(["onnxruntime", *runtimes]))  # ONNX Runtime's row: the search's result, for reference
    built = build_candidates(ancestor or chosen_handle, chosen_handle if ancestor is not None else None, measured,
                             task, out / "work" / "runtimes", min_quality=floor, progress=progress)
    precision = "int8" if is_int8(chosen_handle) else "float"
    pipeline = f"trial {chosen.number}: {describe(chosen.recipe)}"
    candidates = []
    for candidate in built:
        if candidate.handle is chosen_handle and candidate.made_by in ("source", "compactai quantize"):
            candidate.label = f"{candidate.runtime} optimize's model ({precision})"
            candidate.precision, candidate.made_by = precision, f"optimize {pipeline}"
        elif candidate.made_by == "source":
            if candidate.runtime == "onnxruntime":
                continue  # the float ancestor on ONNX Runtime is a model the search measured and passed over
            candidate.made_by = f"float ancestor: {ancestor_how}"
        candidates.append(candidate)
    measure_candidates(candidates, task, config, rounds=rounds, min_quality=floor, progress=progress)
    limits = Budget([c for c in budget.constraints if c.key in RECHECKED])
    for candidate in candidates:
        figures = candidate.figures
        size = figures.get("size_bytes")
        checks = limits.check({**figures, "size_mb": None if size is None else size / 1e6})
        figures["budget_misses"] = [check.describe() for check in checks if not check.ok]
        figures["meets_budget"] = not figures["budget_misses"]
        figures["contender"] = candidate.runtime in runtimes  # else measured for reference only
    best = winners([c for c in candidates if c.figures["contender"] and c.figures["meets_budget"]])
    winner = best["batch_1"]
    ort_row = next((c for c in candidates if c.runtime == "onnxruntime" and c.handle is chosen_handle), None)
    section: dict[str, Any] = {
        "runtimes": runtimes, "measured_runtimes": measured, "quality_floor_validation": floor,
        "constraints": ["quality floor (validation split)"] + [str(c) for c in limits.constraints],
        "not_rechecked": [str(c) for c in budget.constraints if c.key not in RECHECKED and not c.key.startswith("quality")],
        "float_ancestor": ancestor_how, "rounds": rounds,
        "candidates": candidate_rows(candidates),
        "winners": {regime: None if c is None else c.label for regime, c in best.items()},
        "winner": None,
    }
    if winner is None:
        section["note"] = (f"no candidate on {', '.join(runtimes)} met the quality floor and the budget's limits in "
                           "this measurement; model.onnx (ONNX Runtime) stays the result")
        return section, None, ort_row
    section["winner"] = {"label": winner.label, "runtime": winner.runtime, "precision": winner.precision,
                         "made_by": winner.made_by,
                         "recipe": [*(chosen.recipe if winner.handle is chosen_handle else ancestor_recipe),
                                    winner.recipe_step()],
                         "path": "model.onnx"}  # ONNX Runtime's candidates are all the search's model
    if winner.runtime != "onnxruntime":
        section["winner"]["path"] = f"{winner.runtime}/{model_file(winner.handle)}"
        sections = {"runtime_choice": section, "budget": budget.to_dict(), "quality": winner.figures.get("quality")}
        write_candidate(winner, out / winner.runtime, sections, seed, command="optimize")
    return section, winner, ort_row
