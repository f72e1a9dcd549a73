"""The work behind `compactai nas`: search, choose, write model.onnx, architecture.json,
results.json and report.html, and say whether the budget was met."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compactai.measure import MeasureConfig, interleaved_latency, make_runner
from compactai.models.load import load_model
from compactai.report.nas import pareto_indices, write_nas_report
from compactai.results import save_model, write_results
from compactai.tasks import Task
from compactai.techniques.nas._train import train_candidate
from compactai.techniques.nas.build import build_model
from compactai.techniques.nas.predictor import LatencyTable
from compactai.techniques.nas.search import NasConfig, NasOutcome, run_search

ARCHITECTURE_FILE = "architecture.json"


def label(spec: dict[str, Any]) -> str:
    """A short text of an architecture: ``cnn stem8 (sep k3 e3 x2 w8|...) head0``."""
    if spec["family"] == "cnn":
        stages = "|".join(f"{'sep' if s['block'] == 'separable' else 'conv'} k{s['kernel']} e{s['expansion']} "
                          f"x{s['depth']} w{s['width']}{' se' if s['se'] else ''}" for s in spec["stages"])
        return f"cnn stem{spec['stem']} ({stages}) head{spec['head']}"
    if spec["family"] == "mlp":
        return f"mlp {'-'.join(map(str, spec['hidden']))} {spec['activation']}"
    return json.dumps({k: v for k, v in spec.items() if k not in ("input", "classes")})


def run_nas(
    space: dict[str, Any],
    task: Task,
    teacher: Any,
    config: NasConfig,
    out_dir: Path,
    info: dict[str, Any],
    teacher_figures: dict[str, Any] | None,
    remeasure_rounds: int,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Run the search and write the output directory; returns the summary (``status`` ok or
    budget_not_met)."""
    table = LatencyTable(config.threads)
    outcome = run_search(space, task, config, table, teacher=teacher, progress=say)
    eligible = outcome.eligible(config.budget_ms)
    chosen = eligible[0] if eligible else _closest(outcome)
    if chosen is None:
        raise_nothing(outcome)
    model = outcome.models.get(chosen.number)
    if model is None:  # the closest was measured but never trained: train it on the first rung only
        say(f"no candidate met the budget; training the fastest one ({chosen.number}) briefly to write it")
        model = build_model(chosen.spec, seed=config.train.seed)
        train, validation = task.split("train"), task.split("validation")
        name = next(iter(train.inputs))
        short = type(config.train)(**{**config.train.__dict__, "max_epochs": config.min_epochs})
        result, _ = train_candidate(model, train, validation, name, short, None, lambda e, v: False, None, say)
        chosen.validation, chosen.epochs_run, chosen.history = result.best_metric, result.epochs_run, result.history
    input_name = next(iter(task.split("validation").inputs))
    example = torch.from_numpy(task.split("validation").inputs[input_name][:1])
    handle = load_model(model.eval(), {input_name: example}, name="nas-model", output_names=["logits"])
    model_path = save_model(handle, out_dir)  # exported with the parity check
    (out_dir / ARCHITECTURE_FILE).write_text(json.dumps(chosen.spec, indent=2, sort_keys=True), encoding="utf-8")
    onnx_handle = handle.to_onnx(model_path, parity=False)
    test_quality = task.evaluate(make_runner(onnx_handle, "onnxruntime", config.threads))
    final: dict[str, Any] = {}
    if remeasure_rounds and teacher_figures is not None and teacher_figures.get("handle") is not None:
        say(f"re-measuring the chosen model and the teacher in {remeasure_rounds} interleaved rounds")
        rows = interleaved_latency([teacher_figures["handle"], onnx_handle],
                                   MeasureConfig(min_queries=200, min_seconds=0.5, threads=config.threads),
                                   remeasure_rounds)
        final = {"teacher": rows[0], "chosen": rows[1], "rounds": remeasure_rounds}
        chosen_p90 = rows[1]["latency_p90_ms"]
    else:
        chosen_p90 = chosen.latency_p90_ms
    meets = chosen_p90 is not None and chosen_p90 <= config.budget_ms
    learned = learned_enough(chosen.validation, task)
    candidates = [{**c.to_dict(), "label": label(c.spec)} for c in outcome.candidates]
    front = pareto_indices([(c.number, c.latency_p90_ms, c.validation) for c in outcome.candidates
                            if c.validation is not None and c.latency_p90_ms is not None])
    problem = None if meets else (
        f"No candidate met the budget p90 <= {config.budget_ms:.4g} ms (the closest, candidate {chosen.number}, "
        f"measured {chosen_p90:.4g} ms); relax the budget, or search a smaller space (--space).")
    if meets and not learned["passed"]:
        problem = (f"The chosen model did not learn: validation accuracy {chosen.validation} is below the sanity bar "
                   f"{learned['bar']:.4f} ({learned['rule']}); give the search more time (--max-minutes, --epochs).")
    summary = {
        "status": "ok" if problem is None else ("budget_not_met" if not meets else "quality_lost"),
        "problem": problem, "sanity": learned,
        "model": str(model_path), "architecture": str(out_dir / ARCHITECTURE_FILE),
        "budget_ms": config.budget_ms, "threads": config.threads, "space_family": space["family"], "space": space,
        "stopped_by": outcome.stopped_by, "seconds": outcome.seconds, "counts": outcome.counts(),
        "fidelity_schedule": outcome.fidelity_schedule(), "predictor": outcome.predictor, "pareto_front": front,
        "chosen": {**candidates[chosen.number], "latency_p90_ms_remeasured": chosen_p90},
        "test": {"metric": test_quality.metric, "student": test_quality.value, "teacher": task.baseline},
        "teacher": None if teacher_figures is None else {k: v for k, v in teacher_figures.items() if k != "handle"},
        "remeasure": final, "candidates": candidates,
        "settings": {"max_trials": config.max_trials, "max_minutes": config.max_minutes, "min_epochs": config.min_epochs,
                     "reduction_factor": config.reduction_factor, "reject_margin": config.reject_margin,
                     "train": config.train.__dict__, "distillation": teacher is not None},
    }
    write_results(out_dir, "nas", onnx_handle, seed=config.train.seed, source=info, nas=summary)
    write_nas_report(summary, out_dir / "report.html")
    return {**summary, "results": str(out_dir / "results.json"), "report": str(out_dir / "report.html")}


def learned_enough(validation: float | None, task: Task) -> dict[str, Any]:
    """The sanity bar of a searched classifier: half-way from chance to the teacher's accuracy (to
    perfect accuracy without a teacher), so a candidate cut by the deadline before it learned is
    never presented as a result."""
    classes = int(max(int(task.split(name).labels.max()) for name in ("train", "validation"))) + 1  # type: ignore[union-attr]
    chance = 1.0 / classes
    reference = task.baseline if task.baseline is not None else 1.0
    bar = chance + 0.5 * (reference - chance)
    return {"passed": validation is not None and validation >= bar, "bar": bar, "chance": chance,
            "rule": "half-way from chance to the teacher" if task.baseline is not None else "half-way from chance to 1"}


def _closest(outcome: NasOutcome) -> Any:
    """The measured candidate with the lowest p90 (trained ones first): what is written when
    nothing meets the budget."""
    measured = [c for c in outcome.candidates if c.latency_p90_ms is not None and c.status != "failed"]
    trained = [c for c in measured if c.number in outcome.models]
    pool = trained or measured
    return min(pool, key=lambda c: c.latency_p90_ms or 0.0) if pool else None


def raise_nothing(outcome: NasOutcome) -> None:
    from compactai.errors import BudgetNotMetError

    raise BudgetNotMetError(
        f"No candidate could be measured ({outcome.counts()}); every one was rejected by the latency predictor or "
        "failed. Relax the budget or give a space with smaller architectures (--space).")


__all__ = ["ARCHITECTURE_FILE", "label", "run_nas"]
