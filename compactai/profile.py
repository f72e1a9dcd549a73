"""Profile a model on each runtime, with the ONNX export's parity on real inputs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from compactai.export.onnx import compare_outputs
from compactai.measure import MeasureConfig, environment, make_runner, measure
from compactai.models.handle import ModelHandle
from compactai.tasks import Task


def export_parity(handle: ModelHandle, task: Task | None, samples: int = 64) -> dict[str, Any]:
    """Max abs diff per output between torch and the ONNX export on real inputs (the task's
    evaluation split when there is one), plus the task metric's difference."""
    onnx_handle = handle.to_onnx()
    if task is not None:
        split = task.split(task.eval_split).take(samples)
        feeds = next(split.batches(samples))[0]
    else:
        feeds = handle.example_inputs
    torch_out = handle.run_torch(feeds)
    ort_out = make_runner(onnx_handle, "onnxruntime").run(feeds)
    report = compare_outputs(torch_out, ort_out, handle.output_names, tolerance=1e-3)
    result = report.to_dict()
    result["samples"] = len(next(iter(feeds.values())))
    return result


def profile_model(
    handle: ModelHandle,
    task: Task | None = None,
    *,
    runtimes: list[str] | None = None,
    config: MeasureConfig | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measurements on each runtime (torch only for torch models) and the export parity."""
    runtimes = runtimes or ["torch", "onnxruntime"]
    if handle.module is None:
        runtimes = [r for r in runtimes if r != "torch"] or ["onnxruntime"]
    say = progress or (lambda message: None)
    result: dict[str, Any] = {"model": handle.summary(), "measurements": {}, "environment": environment()}
    if handle.module is not None and "onnxruntime" in runtimes:
        say("exporting to ONNX with a parity check")
        result["parity"] = export_parity(handle, task)
    for runtime in runtimes:
        result["measurements"][runtime] = measure(handle, task, runtime=runtime, config=config, progress=say).to_dict()
    if "parity" in result and task is not None:
        qualities = {r: m.get("quality") for r, m in result["measurements"].items()}
        if qualities.get("torch") and qualities.get("onnxruntime"):
            result["parity"]["metric_diff"] = qualities["onnxruntime"]["value"] - qualities["torch"]["value"]
            for key in ("cosine_min", "cosine_mean", "knn_overlap"):
                if key in qualities["onnxruntime"]["details"]:
                    result["parity"][key] = qualities["onnxruntime"]["details"][key]
    if task is not None:
        result["task"] = {"name": task.name, "metric": task.metric.name, "eval_split": task.eval_split,
                          "baseline": task.baseline, "splits": {k: len(v) for k, v in task.splits.items()}}
    return result


