"""Choosing the runtime by measurement (``--runtime NAME|auto``).

The same model can win or lose by runtime, batch size and CPU (docs/runtimes.md), so the
runtime is one more choice measured, not assumed: each candidate (a model file on a runtime:
the float model and compactai's int8 model on every installed runtime, plus each runtime's own
int8 from its official quantizer) is judged for quality on the validation split (the floor) and
the test split (reported), and timed at batch 1 (p50) and at the throughput batch in interleaved
rounds, so load that comes and goes on a shared machine hits every candidate alike. A candidate
that misses the quality floor is never chosen; the fastest of the rest wins each batch regime.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compactai.errors import CompactAIError
from compactai.measure import (
    MeasureConfig,
    batch_feeds,
    fixed_batch,
    installed_runtimes,
    make_runner,
    measure_latency,
    measure_throughput,
    runtime_plugin,
    thread_settings,
    turn_order,
)
from compactai.models.handle import ModelHandle
from compactai.results import save_model, write_results
from compactai.tasks import Task


@dataclass
class RuntimeCandidate:
    """One model file on one runtime, and how it was made."""

    label: str
    runtime: str
    precision: str
    handle: ModelHandle
    made_by: str  # "source", "compactai quantize", "openvino convert int8", ...
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def recipe_step(self) -> dict[str, Any]:
        """The step a recipe records for this choice (runtime + how the file was made)."""
        return {"technique": "runtime", "params": {"runtime": self.runtime, "precision": self.precision,
                                                   "made_by": self.made_by}}


def resolve_runtimes(name: str) -> list[str]:
    """``auto`` -> every installed runtime (ONNX Runtime first); a name -> that runtime, checked."""
    if name == "auto":
        return installed_runtimes()
    plugin = runtime_plugin(name)
    plugin.require()
    return [name]


def build_candidates(
    source: ModelHandle,
    quantized: ModelHandle | None,
    runtimes: list[str],
    task: Task,
    work_dir: Path,
    *,
    min_quality: float | None,
    progress: Callable[[str], None] = lambda message: None,
) -> list[RuntimeCandidate]:
    """The float source and compactai's quantized ONNX model on every runtime in ``runtimes``,
    plus each runtime's own int8 conversion (a conversion that fails is kept with its error)."""
    onnx_source = source.to_onnx() if source.framework == "torch" else source
    candidates = []
    for runtime in runtimes:
        candidates.append(RuntimeCandidate(f"{runtime} fp32", runtime, "fp32", onnx_source, "source"))
        if quantized is not None:
            candidates.append(RuntimeCandidate(f"{runtime} compactai int8", runtime, "int8", quantized,
                                               "compactai quantize"))
        plugin = runtime_plugin(runtime)
        if runtime != "onnxruntime" and plugin.file_format != "onnx":
            progress(f"{runtime}: its own int8 ({plugin.file_format})")
            made_by = f"{runtime} convert int8"
            try:
                converted = plugin.convert(source, work_dir / f"{runtime}-int8", quantize="int8", task=task,
                                           min_quality=min_quality)
            except CompactAIError as exc:  # e.g. the accuracy-aware quantizer cannot reach the floor
                candidates.append(RuntimeCandidate(f"{runtime} int8", runtime, "int8", onnx_source, made_by,
                                                   error=str(exc)))
                continue
            candidates.append(RuntimeCandidate(f"{runtime} int8", runtime, "int8", converted, made_by))
    return candidates


def measure_candidates(
    candidates: list[RuntimeCandidate],
    task: Task,
    config: MeasureConfig,
    *,
    rounds: int = 3,
    min_quality: float | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> list[RuntimeCandidate]:
    """Quality (validation and test), size, batch-1 p50/p90 and batch-B throughput of each candidate
    on its runtime, timed in ``rounds`` interleaved rounds (median over rounds)."""
    live: list[tuple[RuntimeCandidate, Any]] = []
    for candidate in candidates:
        if candidate.error:
            continue
        progress(f"{candidate.label}: loading and judging quality")
        try:
            runner = make_runner(candidate.handle, candidate.runtime, config.threads)
            validation = task.evaluate(runner, "validation") if "validation" in task.splits else None
            test = task.evaluate(runner)
        except (CompactAIError, RuntimeError) as exc:  # a runtime that cannot run this file (e.g. an op)
            candidate.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            continue
        candidate.figures.update(
            quality_validation=None if validation is None else validation.value,
            quality=test.to_dict(), size_bytes=runtime_plugin(candidate.runtime).model_size(candidate.handle),
            runtime_settings=thread_settings(runner),
            meets_floor=min_quality is None or (validation or test).value >= min_quality - 1e-12)
        live.append((candidate, runner))
    if not live:
        return candidates
    source = live[0][0].handle
    rows = fixed_batch(source)
    single = batch_feeds({k: v[:rows] for k, v in source.example_inputs.items()}, rows)
    batch = batch_feeds(single, config.throughput_batch if rows == 1 else rows)
    samples: list[list[tuple[float, float, float]]] = [[] for _ in live]
    for round_number in range(rounds):
        progress(f"timing round {round_number + 1}/{rounds}")
        for index in turn_order(len(live), round_number):
            runner = live[index][1]
            latency = measure_latency(runner, single, min_queries=config.min_queries, min_seconds=config.min_seconds,
                                      warmup=config.warmup)
            throughput, _ = measure_throughput(runner, batch, min_batches=config.throughput_min_batches,
                                               min_seconds=config.min_seconds / 2)
            samples[index].append((latency.p50_ms, latency.p90_ms, throughput))
    for (candidate, _), values in zip(live, samples):
        candidate.figures.update(
            latency_p50_ms=statistics.median(v[0] for v in values),
            latency_p90_ms=statistics.median(v[1] for v in values),
            throughput_items_per_s=statistics.median(v[2] for v in values),
            throughput_batch=len(next(iter(batch.values()))), latency_batch=rows, rounds=rounds,
            rounds_ms=[{"p50": v[0], "p90": v[1], "items_per_s": v[2]} for v in values])
    return candidates


def winners(candidates: list[RuntimeCandidate]) -> dict[str, RuntimeCandidate | None]:
    """The fastest candidate meeting the floor at batch 1 (lowest p50) and at the throughput batch."""
    eligible = [c for c in candidates if not c.error and c.figures.get("meets_floor") and "latency_p50_ms" in c.figures]
    return {
        "batch_1": min(eligible, key=lambda c: c.figures["latency_p50_ms"], default=None),
        "throughput": max(eligible, key=lambda c: c.figures["throughput_items_per_s"], default=None),
    }


def candidate_rows(candidates: list[RuntimeCandidate]) -> list[dict[str, Any]]:
    """Plain data for results.json: one row per candidate."""
    return [{"label": c.label, "runtime": c.runtime, "precision": c.precision, "made_by": c.made_by,
             "error": c.error, **c.figures} for c in candidates]


def write_candidate(candidate: RuntimeCandidate, out_dir: Path, result: dict[str, Any], seed: int,
                    command: str = "quantize") -> dict[str, str]:
    """The candidate's model file(s) (save_model: model.onnx, or model.xml + model.bin for OpenVINO
    IR) and a results.json whose recipe ends with its runtime step; ``result``'s sections go with it."""
    history = [*candidate.handle.metadata.get("history", []), candidate.recipe_step()]
    handle = candidate.handle.derive(metadata={**candidate.handle.metadata, "history": history,
                                               "runtime": candidate.runtime})
    model = save_model(handle, out_dir)
    sections = {k: v for k, v in result.items() if k not in ("command", "paths")}
    sections["measurement"] = {"runtime": candidate.runtime, **candidate.figures}
    return {"model": str(model), "results": str(write_results(out_dir, command, handle, seed=seed, **sections))}
