"""`optimize`: baseline -> search -> select -> final measurement -> model.onnx, results.json, report.html."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from compactai.budget import Budget
from compactai.errors import BudgetNotMetError
from compactai.measure import MeasureConfig, environment, make_runner, measure
from compactai.models.handle import ModelHandle
from compactai.results import describe, save_model, to_jsonable
from compactai.search.deployment import split_choice
from compactai.search.engine import SearchConfig, run_search
from compactai.search.fidelity import schedule_table
from compactai.search.remeasure import interleave_final, interleaved_selection_figures
from compactai.search.runtime_stage import choose_runtime_after_search
from compactai.search.runtimes import resolve_runtimes
from compactai.search.select import Selection, select
from compactai.search.space import SearchSpace, space_for_model
from compactai.search.trial import StepCache, TrialResult, apply_recipe, figures_for
from compactai.tasks import Task, trim_padding

FINAL_MEASURE = MeasureConfig(min_queries=300, min_seconds=1.5, warmup=30, throughput_batch=32,
                              throughput_min_batches=10, memory=True)


def measure_candidate(handle: ModelHandle, task: Task, config: MeasureConfig, selection_split: str,
                      selection_baseline: float | None = None) -> dict[str, Any]:
    """Measurement on ONNX Runtime + quality on the selection split (and test quality)."""
    onnx_handle = handle.to_onnx() if handle.framework == "torch" else handle
    measured = measure(onnx_handle, None, runtime="onnxruntime", config=config).to_dict(samples=True)
    runner = make_runner(onnx_handle, "onnxruntime", config.threads)
    quality = task.evaluate(runner, split=selection_split)
    if selection_baseline is not None:
        quality.baseline = selection_baseline
    figures = figures_for(measured, quality.to_dict())
    figures["test_quality"] = task.evaluate(runner).to_dict()
    return figures


def optimize(
    handle: ModelHandle,
    task: Task,
    budget: Budget,
    out_dir: str | Path,
    config: SearchConfig | None = None,
    *,
    space: SearchSpace | None = None,
    source: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    on_trial: Callable[[TrialResult], None] | None = None,
    write_report: bool = True,
    runtime: str = "onnxruntime",
) -> dict[str, Any]:
    """Find the best model within ``budget``; writes the output directory and returns results.json's data.

    ``runtime``: ``onnxruntime`` (the search's runtime; nothing more), another installed runtime or
    ``auto`` (every installed one): the chosen model is then measured on those runtimes next to
    their own int8 conversions, and the fastest that keeps the budget wins (search/runtime_stage.py).

    Raises BudgetNotMetError (after writing results, report and the closest candidates) when no
    candidate fits.
    """
    config = config or SearchConfig()
    config.check()  # before the output directory is made: a refused run leaves nothing behind
    runtimes = None if runtime == "onnxruntime" else resolve_runtimes(runtime)  # unknown/uninstalled: fails here
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: None)
    started = time.monotonic()
    space = space or space_for_model(handle, task, budget)
    if not space.stages:
        from compactai.errors import BadInputError

        why = "; ".join(f"{name}: {reason}" for name, reason in space.skipped.items())
        raise BadInputError(f"No registered technique applies to this {handle.kind} {handle.framework} model"
                            + (f" ({why})." if why else "."))
    for name, reason in space.skipped.items():
        say(f"skipping {name}: {reason}")
    selection_split = config.selection_split if config.selection_split in task.splits else task.eval_split
    config.selection_split = selection_split
    from compactai.search.engine import check_study  # fail fast on an existing study before any work

    check_study(out, config)
    say("measuring the original model")
    baseline_path = out / "baseline" / "model.onnx"
    baseline_handle = handle.to_onnx(baseline_path) if handle.framework == "torch" else handle
    runner = make_runner(baseline_handle, "onnxruntime", config.measure.threads)
    selection_baseline = task.evaluate(runner, split=selection_split).value
    baseline_quick = measure_candidate(baseline_handle, task, config.measure, selection_split, selection_baseline)
    requested = str(budget)
    unresolved = budget
    budget = budget.resolve(baseline_quick)
    say(f"budget: {budget}")
    outcome = run_search(handle, task, budget, space, out, config, selection_baseline=selection_baseline,
                         on_trial=on_trial, progress=say)
    budget, remeasured = interleaved_selection_figures(
        lambda trial: _load_artifact(handle, trial), baseline_handle, outcome.trials, unresolved, budget,
        baseline_quick, config.measure, rounds=config.remeasure_rounds, progress=say)
    selection = select(outcome.trials, budget)
    say("final measurement of the original and the chosen model")
    baseline_final = measure_candidate(baseline_handle, task, FINAL_MEASURE_with(config), selection_split,
                                       selection_baseline)
    chosen_final = None
    runtime_choice: dict[str, Any] | None = None
    chosen_recipe = selection.chosen.recipe if selection.chosen else []

    def runtime_stage(trial: TrialResult, model: ModelHandle) -> Any:
        assert runtimes is not None
        return choose_runtime_after_search(
            handle, model, trial, outcome.trials, lambda result: _load_artifact(handle, result), task, budget,
            runtimes, out, FINAL_MEASURE_with(config), selection_baseline=selection_baseline,
            rounds=max(1, config.remeasure_rounds), seed=config.seed, progress=say)
    chosen_lineage = selection.chosen.lineage if selection.chosen else []
    waterfall: list[dict[str, Any]] = []
    if selection.chosen is not None:
        chosen_handle = _load_artifact(handle, selection.chosen)
        chosen_final = measure_candidate(chosen_handle, task, FINAL_MEASURE_with(config), selection_split,
                                         selection_baseline)
        interleave_final(baseline_final, chosen_final, (baseline_handle, chosen_handle), FINAL_MEASURE_with(config),
                         config.remeasure_rounds, say)
        save_model(chosen_handle, out)
        say("per-technique contribution of the chosen pipeline")
        waterfall = build_waterfall(handle, task, selection.chosen, outcome.trials, baseline_quick, out, config,
                                    selection_baseline)
        if runtimes is not None:
            runtime_choice, winner, ort_row = runtime_stage(selection.chosen, chosen_handle)
            runtime_choice["for"] = "the chosen model"
            if ort_row is not None:  # model.onnx's own recipe ends with the runtime that runs it
                runtime_step = {**ort_row.recipe_step(), "decisions": {"winner": None if winner is None
                                                                       else winner.label}}
                chosen_recipe = [*selection.chosen.recipe, ort_row.recipe_step()]
                chosen_lineage = [*selection.chosen.lineage, runtime_step]
    else:
        _write_closest(out, selection)
        if selection.closest:  # the closest model is the output, marked as not meeting the budget
            closest_handle = _load_artifact(handle, selection.closest[0])
            chosen_final = measure_candidate(closest_handle, task, FINAL_MEASURE_with(config), selection_split,
                                             selection_baseline)
            save_model(closest_handle, out)
            if runtimes is not None:  # another runtime may bring the closest model within the budget
                runtime_choice = runtime_stage(selection.closest[0], closest_handle)[0]
                runtime_choice["for"] = "the closest model (no model met the budget on ONNX Runtime)"
    closest = selection.closest[0] if selection.chosen is None and selection.closest else None
    split = None
    if config.network is not None and selection.chosen is not None:
        say("placing the chosen model on the stated network (slicing cost model)")
        samples = trim_padding({k: v[:64] for k, v in task.splits[selection_split].inputs.items()})
        split = split_choice(out / "model.onnx", samples, config.network, threads=config.measure.threads,
                             progress=say)
    if runtimes is not None and runtime_choice is None:
        runtime_choice = {"runtimes": runtimes, "winner": None,
                          "note": "no model was written, so no runtime was chosen"}
    results = {
        "command": "optimize",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": config.seed,
        "environment": environment(),
        "source": source or {},
        "model": {"name": handle.name, "kind": handle.kind, "framework": handle.framework,
                  "inputs": [s.to_dict() for s in handle.inputs], "outputs": [s.to_dict() for s in handle.outputs],
                  "fingerprint": handle.fingerprint(),
                  "path": "model.onnx" if selection.chosen or closest else None},
        "budget_met": selection.chosen is not None,
        "task": {"name": task.name, "metric": task.metric.name, "selection_split": selection_split,
                 "test_split": task.eval_split, "baseline_test": task.baseline, "baseline_selection": selection_baseline},
        "budget": {**budget.to_dict(), "requested": requested},
        "search": {"space": space.to_dict(), "max_trials": config.max_trials, "max_minutes": config.max_minutes,
                   "executor": config.executor, "storage": outcome.storage, "stopped_by": outcome.stopped_by,
                   "interrupted": outcome.interrupted, "seconds": time.monotonic() - started,
                   "trials_finished": len(outcome.trials), "remeasured": remeasured,
                   "fidelity": {**asdict(config.fidelity), "schedule": schedule_table(outcome.trials),
                                "pruned": sum(t.status == "pruned" for t in outcome.trials)}},
        "baseline": _strip(baseline_final),
        "chosen": None if selection.chosen is None else {
            "trial": selection.chosen.number, "recipe": chosen_recipe,
            "label": describe(chosen_recipe), "lineage": chosen_lineage,
            "figures": _strip(chosen_final), "search_figures": selection.chosen.figures},
        "closest": None if closest is None else {
            "trial": closest.number, "recipe": closest.recipe, "label": describe(closest.recipe),
            "lineage": closest.lineage, "figures": _strip(chosen_final), "search_figures": closest.figures,
            "note": "written as model.onnx; it does NOT meet the budget (see selection.checks)"},
        "recipe": chosen_recipe,
        "lineage": chosen_lineage,
        "measurements": {"onnxruntime": _strip(chosen_final)} if chosen_final else {},
        "quality": chosen_final["test_quality"] if chosen_final else None,
        "selection": {"explanation": selection.explain(budget), "pareto_front": [r.number for r in selection.front],
                      "closest": [r.number for r in selection.closest],
                      "checks": [{"constraint": str(c.constraint), "actual": c.actual, "ok": c.ok, "slack": c.slack,
                                  "text": c.describe()} for c in
                                 (budget.check(chosen_final) if chosen_final else selection.failed_checks)],
                      "stop_reason": stop_reason(outcome.stopped_by, space)},
        "waterfall": waterfall,
        "split": split,
        **({"runtime_choice": runtime_choice} if runtimes is not None else {}),
        "trials": [r.to_dict() for r in outcome.trials],
        "latency_samples_ms": {"original": baseline_final.get("latency_samples_ms", []),
                               "chosen": (chosen_final or {}).get("latency_samples_ms", [])},
    }
    _write_json(out / "results.json", results)
    if write_report:
        from compactai.report import write_report as render

        render(results, out / "report.html")
    _cleanup_trials(out, selection)
    if selection.chosen is None:
        wrote = (f"The closest model is written to {out / 'model.onnx'} (it does not meet the budget), the "
                 f"closest candidates to {out / 'candidates'}" if closest else "No model is written")
        found = (runtime_choice or {}).get("winner")
        if found:  # exit 3 stays: the budget was checked on ONNX Runtime; this is the runtime stage's finding
            wrote += (f". On {found['runtime']}, {found['label']} keeps the quality floor and the limits measured "
                      f"again in the runtime stage: written to {out / found['path']}")
        raise BudgetNotMetError(
            f"{selection.explain(budget)}. {wrote}; report: {out / 'report.html'}. "
            f"{stop_reason(outcome.stopped_by, space)}"
        )
    return results


def stop_reason(stopped_by: str, space: SearchSpace) -> str:
    """Why the search stopped, and what could change the outcome (more time helps only when
    candidates were left untried)."""
    if stopped_by == "exhausted":
        return (f"Every candidate the search space allows has run ({space.size() or 'all'}); more trials or "
                "minutes cannot help: relax the budget, or allow other techniques"
                + (f" (skipped: {', '.join(space.skipped)})" if space.skipped else "") + ".")
    if stopped_by == "max_trials":
        return "The trial limit stopped the search with candidates left untried: allow more trials (--max-trials)."
    if stopped_by == "time":
        return "The time limit stopped the search with candidates left untried: allow more minutes (--max-minutes)."
    return "The search was interrupted; --resume continues it."


def FINAL_MEASURE_with(config: SearchConfig) -> MeasureConfig:
    final = MeasureConfig(**FINAL_MEASURE.__dict__)
    final.threads = config.measure.threads
    final.memory = config.measure.memory or FINAL_MEASURE.memory
    if config.measure.min_queries < 50:  # a quick (test) run stays quick at the end too
        final.min_queries, final.min_seconds, final.warmup = 50, 0.2, 5
    return final


def _load_artifact(handle: ModelHandle, result: TrialResult) -> ModelHandle:
    from compactai.models.load import load_onnx

    loaded = load_onnx(Path(result.artifact), name=handle.name, kind=handle.kind)  # type: ignore[arg-type]
    loaded.example_inputs = dict(handle.example_inputs)
    loaded.metadata["history"] = result.lineage
    if result.figures.get("macs") is not None:
        loaded.metadata["macs"] = result.figures["macs"]
    return loaded


def build_waterfall(handle: ModelHandle, task: Task, chosen: TrialResult, trials: list[TrialResult],
                    baseline: dict[str, Any], out: Path, config: SearchConfig,
                    selection_baseline: float | None = None) -> list[dict[str, Any]]:
    """Figures after each step of the chosen recipe: from finished trials when one ran exactly
    that prefix, else by re-applying the prefix (cached step by step)."""
    by_recipe = {json.dumps(t.recipe, sort_keys=True): t for t in trials if t.status == "ok"}
    steps = [{"step": "original", **_summary(baseline)}]
    cache = StepCache()
    for k in range(1, len(chosen.recipe) + 1):
        prefix = chosen.recipe[:k]
        label = describe(prefix[-1:])
        found = by_recipe.get(json.dumps(prefix, sort_keys=True))
        if found is not None:
            steps.append({"step": label, "trial": found.number, **_summary(found.figures)})
            continue
        try:
            current, _ = apply_recipe(handle, task, prefix, out / "work", cache=cache, seed=config.seed)
            figures = measure_candidate(current, task, config.measure, config.selection_split, selection_baseline)
            steps.append({"step": label, **_summary(figures)})
        except Exception as exc:  # noqa: BLE001 the waterfall is a report aid; never lose the result over it
            steps.append({"step": label, "error": f"{type(exc).__name__}: {exc}"[:300]})
    return steps


def _summary(figures: dict[str, Any]) -> dict[str, Any]:
    keys = ("quality", "quality_relative", "latency_p50_ms", "latency_p90_ms", "size_mb", "throughput_items_per_s",
            "params", "macs")
    return {k: figures.get(k) for k in keys}


def _strip(figures: dict[str, Any] | None) -> dict[str, Any] | None:
    if figures is None:
        return None
    return {k: v for k, v in figures.items() if k != "latency_samples_ms"}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2))
    os.replace(tmp, path)


def _write_closest(out: Path, selection: Selection) -> None:
    target = out / "candidates"
    shutil.rmtree(target, ignore_errors=True)
    for rank, result in enumerate(selection.closest, 1):
        if result.artifact and Path(result.artifact).exists():
            folder = target / f"{rank}-trial{result.number:04d}"
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result.artifact, folder / "model.onnx")
            _write_json(folder / "trial.json", result.to_dict())


def _cleanup_trials(out: Path, selection: Selection) -> None:
    """Keep trial models on the Pareto front (and the chosen/closest); drop the rest to save disk."""
    keep = {r.number for r in selection.front + selection.closest}
    if selection.chosen is not None:
        keep.add(selection.chosen.number)
    for folder in (out / "trials").glob("*"):
        if folder.is_dir() and folder.name.isdigit() and int(folder.name) not in keep:
            shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(out / "work", ignore_errors=True)
