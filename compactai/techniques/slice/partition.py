"""Memory-constrained partition: K consecutive parts, part i on device i with memory limit M_i,
minimising the slowest stage (pipeline throughput) or the sum of stages (latency).

The graph is first cut into short segments at up to ``max_cuts`` cuts; each segment's latency and
memory are measured (memory in a subprocess: peak RSS minus the runtime's RSS before loading).
The search over groupings of segments uses those figures (latency adds up; memory = the part's
weights + the largest activation overhead of its segments); the chosen parts are then extracted and
measured for real, and if a part exceeds its limit its estimate is raised by the excess and the
search runs again.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compactai.errors import BadInputError
from compactai.measure.memory import measure_peak_memory
from compactai.models.load import load_onnx
from compactai.techniques.slice.graph import LOCAL, REMOTE, Cut, Graph, observe
from compactai.techniques.slice.placement import Part, SliceConfig, _run_model, _runner, fidelity, select_cuts

OBJECTIVES = ("slowest", "sum")


def _weights_mb(model: onnx.ModelProto) -> float:
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer) / 2**20


def partition(model_path: Path, samples: dict[str, np.ndarray], parts: int, limits_mb: list[float],
              config: SliceConfig, workdir: Path, objective: str = "slowest",
              progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """The best K-part split under ``limits_mb``; raises BadInputError when no split fits."""
    if objective not in OBJECTIVES:
        raise BadInputError(f"Unknown partition objective {objective!r}; choose {' or '.join(OBJECTIVES)}.")
    if len(limits_mb) != parts or parts < 2:
        raise BadInputError(f"A {parts}-part partition needs {parts} memory limits (2 or more parts); "
                            f"got {len(limits_mb)}.")
    workdir.mkdir(parents=True, exist_ok=True)
    graph = Graph.load(model_path)
    cuts = [c for c in select_cuts(graph.enumerate_cuts(config.max_tensors), config.max_cuts)
            if c.kind not in (LOCAL, REMOTE)]
    if len(cuts) < parts - 1:
        raise BadInputError(f"The model has {len(cuts)} cuts of at most {config.max_tensors} tensors, too few for "
                            f"{parts} parts; raise --max-tensors or lower --parts.")
    bounds = [Cut(tuple(graph.inputs), 0, REMOTE), *cuts, Cut(tuple(graph.outputs), len(graph.nodes), LOCAL)]
    single = {k: v[:1] for k, v in samples.items() if k in graph.inputs}
    names = sorted({t for c in bounds for t in c.tensors} - set(graph.inputs))
    observed = {**observe(graph.model, single, names), **single}

    def build(start: int, end: int, tag: str) -> tuple[Part, float]:
        inputs = graph.inputs if start == 0 else list(bounds[start].tensors)
        model = graph.extract(inputs, list(bounds[end].tensors), tag, observed)
        path = workdir / f"{tag}.onnx"
        onnx.save(model, str(path))
        return Part(path, inputs, list(bounds[end].tensors)), _weights_mb(model)

    def measure(part: Part) -> tuple[float, float]:
        runner = _runner(part.path, observed, config.threads)  # type: ignore[arg-type]
        from compactai.measure import measure_latency

        ms = measure_latency(runner, runner.handle.example_inputs, min_queries=config.min_queries,
                             min_seconds=config.min_seconds, warmup=5).p50_ms
        handle = load_onnx(part.path)  # type: ignore[arg-type]
        handle.example_inputs = {k: v for k, v in observed.items() if k in handle.input_names}
        stats = measure_peak_memory(handle, "onnxruntime", config.threads or 1)
        if stats is None:
            raise BadInputError(f"Could not measure the memory of {part.path}; check that ONNX Runtime runs it.")
        return ms, stats.model_mb

    segments = []
    for index in range(len(bounds) - 1):
        progress(f"measuring segment {index + 1}/{len(bounds) - 1} (latency, memory in a subprocess)")
        part, weights = build(index, index + 1, f"segment{index:02d}")
        ms, memory = measure(part)
        segments.append({"ms": ms, "weights_mb": weights, "overhead_mb": max(memory - weights, 0.0),
                         "memory_mb": memory})
    smallest = min(s["memory_mb"] for s in segments)
    for number, limit in enumerate(limits_mb, start=1):
        if limit < smallest:
            raise BadInputError(f"--device-memory-mb limit {number} ({limit:g} MB) is below the smallest part this "
                                f"model splits into ({smallest:.1f} MB measured); raise it.")
    correction = [0.0] * parts
    for attempt in range(3):
        best = _search(segments, parts, limits_mb, objective, correction)
        if best is None:
            need = sum(s["weights_mb"] for s in segments)
            raise BadInputError(f"No {parts}-part split fits the limits {limits_mb} MB (the weights alone are "
                                f"{need:.1f} MB); raise the limits or add parts.")
        boundaries = [0, *best, len(bounds) - 1]
        results: list[dict[str, Any]] = []
        for number in range(parts):
            progress(f"measuring part {number + 1}/{parts} of the chosen split")
            part, weights = build(boundaries[number], boundaries[number + 1], f"try{attempt}_part{number + 1}")
            ms, memory = measure(part)
            results.append({"path": str(part.path), "first_tensors": " + ".join(part.inputs)[:60],
                            "inputs": part.inputs, "outputs": part.outputs, "weights_mb": weights,
                            "measured_memory_mb": memory, "limit_mb": limits_mb[number], "latency_ms": ms,
                            "estimated_memory_mb": _estimate(segments, boundaries[number], boundaries[number + 1])})
        over = [r["measured_memory_mb"] - r["limit_mb"] for r in results]
        if all(o <= 0 for o in over):
            break
        correction = [c + max(o, 0.0) for c, o in zip(correction, over)]
    else:
        raise BadInputError(f"The chosen parts measured above their limits three times ({over} MB over); raise "
                            "the limits or add parts.")
    # the composed parts against the unsplit model
    batch = {k: v[:config.samples] for k, v in samples.items() if k in graph.inputs}
    reference = _run_model(Part(model_path, graph.inputs, graph.outputs), batch, config.threads)
    values: dict[str, np.ndarray] = dict(batch)
    for result in results:
        values.update(_run_model(Part(Path(result["path"]), result["inputs"], result["outputs"]), values,
                                 config.threads))
    check = fidelity(reference, {k: values[k] for k in graph.outputs})
    stages = [r["latency_ms"] for r in results]
    return {"objective": objective, "parts": results, "slowest_stage_ms": max(stages), "sum_ms": sum(stages),
            "max_abs_diff": check["max_abs_diff"], "fidelity": check, "segments": segments,
            "cuts": [c.to_dict() for c in bounds]}


def _estimate(segments: list[dict[str, float]], start: int, end: int) -> float:
    chosen = segments[start:end]
    return sum(s["weights_mb"] for s in chosen) + max(s["overhead_mb"] for s in chosen)


def _search(segments: list[dict[str, float]], parts: int, limits: list[float], objective: str,
            correction: list[float]) -> tuple[int, ...] | None:
    """Inner boundaries (segment indexes) of the best grouping whose estimates fit the limits."""
    best: tuple[float, tuple[int, ...]] | None = None
    for inner in itertools.combinations(range(1, len(segments)), parts - 1):
        boundaries = [0, *inner, len(segments)]
        fits = all(_estimate(segments, boundaries[i], boundaries[i + 1]) + correction[i] <= limits[i]
                   for i in range(parts))
        if not fits:
            continue
        stages = [sum(s["ms"] for s in segments[boundaries[i]:boundaries[i + 1]]) for i in range(parts)]
        score = max(stages) if objective == "slowest" else sum(stages)
        if best is None or score < best[0]:
            best = (score, inner)
    return None if best is None else best[1]
