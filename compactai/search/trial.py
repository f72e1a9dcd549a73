"""Running one trial: apply a recipe's steps (cached by content), export, measure, score."""

from __future__ import annotations

import hashlib
import json
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compactai.budget import Budget
from compactai.measure import MeasureConfig, measure
from compactai.models.handle import ModelHandle
from compactai.results import save_model
from compactai.tasks import Task
from compactai.techniques.base import Context, create_technique


@dataclass
class TrialResult:
    """What one trial produced: figures on the selection split, status, artifact and lineage."""

    number: int
    recipe: list[dict[str, Any]]
    status: str  # "ok" | "failed" | "pruned" (stopped at a rung of the multi-fidelity schedule: its figures are the rung's)
    error: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)  # Measurement dict + quality fields
    test_quality: dict[str, Any] | None = None
    artifact: str | None = None
    lineage: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    feasible: bool = False
    violation: float = float("inf")
    cached_steps: int = 0
    # the multi-fidelity schedule of a trial with a training step: {"rungs": [epochs...], "epochs": reached,
    # "history": [{"epochs", "quality", "seconds"}...], "decision": completed | pruned | time}
    fidelity: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["violation"] == float("inf"):
            data["violation"] = None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        data = dict(data)
        if data.get("violation") is None:
            data["violation"] = float("inf")
        return cls(**data)


def step_key(parent: str, step: dict[str, Any]) -> str:
    """Content hash of (parent model key, technique, params): identical prefixes share work."""
    text = json.dumps({"parent": parent, "technique": step["technique"], "params": step["params"]}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StepCache:
    """In-memory cache of intermediate models by step key (a pruned model is not recomputed
    for every quantization setting). Bounded, oldest evicted first."""

    def __init__(self, max_items: int = 8) -> None:
        self.items: dict[str, ModelHandle] = {}
        self.max_items = max_items

    def get(self, key: str) -> ModelHandle | None:
        handle = self.items.get(key)
        if handle is not None:
            self.items[key] = self.items.pop(key)  # most recent last
        return handle

    def put(self, key: str, handle: ModelHandle) -> None:
        self.items[key] = handle
        while len(self.items) > self.max_items:
            self.items.pop(next(iter(self.items)))


def apply_recipe(
    handle: ModelHandle,
    task: Task,
    recipe: list[dict[str, Any]],
    work_dir: Path,
    *,
    cache: StepCache | None = None,
    seed: int = 0,
    deadline: float | None = None,
    progress: Any = None,
    stop_epoch: int | None = None,
) -> tuple[ModelHandle, int]:
    """Apply the recipe's steps in order; returns the final handle and how many steps came from cache.
    ``stop_epoch``: training steps (a technique with a ``fidelity_param``) pause at the end of that
    epoch; their work directory does not depend on it, so a later call with a larger value continues
    from the checkpoint, while the cache keys of the step and of every later step do."""
    from compactai.techniques.base import available_techniques

    registry = available_techniques()
    key = handle.fingerprint()
    current = handle
    cached = 0
    for index, step in enumerate(recipe):
        resource = registry[step["technique"]].fidelity_param
        # a step that trains (a pruning without fine-tuning does not) runs to the rung, keyed by it
        trains = stop_epoch is not None and resource is not None and step["params"].get(resource, 1) != 0
        base_key = step_key(key, step)
        key = step_key(key, {**step, "params": {**step["params"], "(stop_epoch)": stop_epoch}}) if trains else base_key
        hit = cache.get(key) if cache is not None else None
        if hit is not None:
            current, cached = hit, cached + 1
            continue
        if current.module is not None or "macs" not in current.metadata:  # quantization keeps MACs: carry them
            from compactai.measure import count_macs

            # on a derived handle: the caller's (and a cached step's) metadata stay as they were
            current = current.derive(metadata={**current.metadata, "macs": count_macs(current)})
        technique = create_technique(step["technique"], **step["params"])
        step_dir = work_dir / f"step{index}-{step['technique']}-{base_key}"
        step_dir.mkdir(parents=True, exist_ok=True)
        context = Context(task=task, teacher=handle, seed=seed, work_dir=step_dir,
                          progress=progress or (lambda message: None), deadline=deadline,
                          stop_epoch=stop_epoch if trains else None)
        current = technique.apply(current, context)
        if cache is not None:
            cache.put(key, current)
    return current, cached


def figures_for(measurement: dict[str, Any], quality: dict[str, Any] | None) -> dict[str, Any]:
    """A measurement dict plus the flat quality fields the budget reads."""
    figures = dict(measurement)
    figures.pop("quality", None)
    if quality:
        figures["quality"] = quality["value"]
        figures["quality_relative"] = quality.get("relative")
        figures["quality_metric"] = quality["metric"]
        figures["quality_details"] = quality.get("details", {})
    return figures


def run_trial(
    number: int,
    handle: ModelHandle,
    task: Task,
    recipe: list[dict[str, Any]],
    budget: Budget,
    out_dir: Path,
    measure_config: MeasureConfig,
    *,
    selection_split: str = "validation",
    selection_baseline: float | None = None,
    cache: StepCache | None = None,
    seed: int = 0,
    deadline: float | None = None,
    progress: Any = None,
    stop_epoch: int | None = None,
) -> TrialResult:
    """Apply, export, measure on ONNX Runtime, score on the selection split (and the test split).
    Any exception becomes a failed TrialResult carrying the error, never a crash of the search."""
    start = time.monotonic()
    trial_dir = out_dir / "trials" / f"{number:04d}"
    try:
        final, cached = apply_recipe(handle, task, recipe, out_dir / "work", cache=cache, seed=seed,
                                     deadline=deadline, progress=progress, stop_epoch=stop_epoch)
        artifact = save_model(final, trial_dir)
        onnx_handle = final.to_onnx() if final.framework == "torch" else final
        onnx_handle = onnx_handle.derive(path=artifact, metadata=dict(final.metadata))
        measured = measure(onnx_handle, None, runtime="onnxruntime", config=measure_config).to_dict()
        from compactai.measure import make_runner

        runner = make_runner(onnx_handle, "onnxruntime", measure_config.threads)
        quality = task.evaluate(runner, split=selection_split if selection_split in task.splits else None)
        if selection_baseline is not None:
            quality.baseline = selection_baseline
        test_quality = task.evaluate(runner).to_dict() if task.eval_split != selection_split else None
        figures = figures_for(measured, quality.to_dict())
        result = TrialResult(
            number, recipe, "ok", figures=figures, test_quality=test_quality, artifact=str(artifact),
            lineage=final.metadata.get("history", []), seconds=time.monotonic() - start, cached_steps=cached,
        )
        result.feasible = budget.satisfied(figures)
        result.violation = budget.violation(figures)
        return result
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 a failed trial is a record, not a crash
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500]
        return TrialResult(number, recipe, "failed", error=message, seconds=time.monotonic() - start,
                           lineage=[{"traceback": traceback.format_exc(limit=4)[-1500:]}])
