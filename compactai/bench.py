"""`compactai bench`'s work: MLPerf-style scenarios, quality against the fp32 reference and the
roofline, for one model on one runtime. Returns plain data (the JSON the command prints)."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from compactai.measure import default_threads, environment, make_runner, runtime_plugin
from compactai.measure.mlperf import (
    MLPERF_MINIMUMS,
    Feeds,
    ScenarioSettings,
    offline,
    quality_verdict,
    server,
    server_search,
    single_stream,
    stack_samples,
)
from compactai.measure.roofline import roofline
from compactai.measure.stats import count_macs, fixed_batch
from compactai.models.handle import ModelHandle
from compactai.tasks import Task, trim_padding

MAX_SAMPLES = 256  # distinct query samples drawn from the evaluation split (MLPerf's performance sample set)
_INT8_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "DynamicQuantizeLinear", "MatMulNBits"}


def query_samples(handle: ModelHandle, task: Task | None, limit: int = MAX_SAMPLES) -> list[Feeds]:
    """Batch-1 queries: rows of the task's evaluation split (padding trimmed per row), or the
    model's example inputs when there is no task."""
    rows = fixed_batch(handle)
    if task is None or rows != 1:
        return [{k: v[:rows] for k, v in handle.example_inputs.items()}]
    split = task.split(task.eval_split)
    names = handle.input_names
    return [trim_padding({n: split.inputs[n][i:i + 1] for n in names}) for i in range(min(len(split), limit))]


def is_int8(handle: ModelHandle) -> bool:
    """True when the ONNX graph computes with integer kernels (quantized Conv/MatMul), or a
    runtime's own file was converted to int8 (its converter's record in the metadata)."""
    if handle.framework == "openvino" and handle.path is not None:  # NNCF's int8 IR: FakeQuantize ahead of int8 ops
        return 'type="FakeQuantize"' in Path(handle.path).read_text(encoding="utf-8", errors="replace")
    if handle.framework != "onnx" or handle.path is None:
        return (handle.metadata.get(handle.framework) or {}).get("precision") == "int8" \
            if handle.framework != "torch" else False
    import onnx

    graph = onnx.load(str(handle.path), load_external_data=False).graph
    return any(node.op_type in _INT8_OPS for node in graph.node)


def run_bench(
    handle: ModelHandle,
    task: Task | None,
    scenarios: Sequence[str],
    settings: ScenarioSettings,
    *,
    runtime: str = "onnxruntime",
    threads: int | None = None,
    quality: bool = True,
    progress: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Run ``scenarios`` (single-stream, offline, server) on ``runtime``, then quality on the
    task's evaluation split with MLPerf's 99% / 99.9%-of-fp32 verdict. The server scenario runs at
    ``settings.target_qps`` and searches for the highest rate within ``settings.latency_bound_ms``."""
    settings.check()
    threads = threads or default_threads()
    with tempfile.TemporaryDirectory(prefix=f"compactai-bench-{runtime}-") as work:
        handle = for_runtime(handle, runtime, task, Path(work), progress)
        runner = make_runner(handle, runtime, threads)
        try:
            return _run(handle, runner, task, scenarios, settings, runtime=runtime, threads=threads, quality=quality,
                        progress=progress)
        finally:
            close = getattr(runner, "close", None)  # a device runtime's worker process
            if callable(close):
                close()


def for_runtime(handle: ModelHandle, runtime: str, task: Task | None, work: Path,
                progress: Callable[[str], None] = lambda message: None) -> ModelHandle:
    """``handle`` as ``runtime`` runs it: as it is when the runtime reads its format (ONNX Runtime
    and OpenVINO read ONNX, exported from torch on demand), else converted by the runtime's own
    tool with its parity check (LiteRT .tflite, ExecuTorch .pte: from a torch model)."""
    plugin = runtime_plugin(runtime)
    plugin.require()
    readable = handle.framework in plugin.formats or (handle.framework == "torch" and "onnx" in plugin.formats)
    if readable or runtime == "torch":  # torch eager runs only torch modules: its runner says so
        return handle
    progress(f"converting to {plugin.file_format} for {runtime}")
    return plugin.convert(handle, work / runtime, task=task)


def _run(handle: ModelHandle, runner: Any, task: Task | None, scenarios: Sequence[str], settings: ScenarioSettings,
         *, runtime: str, threads: int, quality: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    samples = query_samples(handle, task)
    result: dict[str, Any] = {
        "model": {"name": handle.name, "framework": handle.framework, "inputs": [s.name for s in handle.inputs]},
        "runtime": runtime, "threads": threads, "query_samples": len(samples),
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        "mlperf_minimums": dict(MLPERF_MINIMUMS),
        "scenarios": {}, "load_average": list(os.getloadavg()), "environment": environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": "engineering measurement with short runs; not an MLPerf submission (see mlperf_minimums)",
    }
    # torch eager has no file: the size of its ONNX export, as before runtimes were plug-ins
    size = runtime_plugin("onnxruntime" if runtime == "torch" else runtime).model_size(handle)
    result["size_mb"] = None if size is None else size / 1e6
    result["macs_per_item"] = count_macs(handle) if handle.framework in ("onnx", "torch") \
        else handle.metadata.get("macs")
    figures = result["scenarios"]
    if "single-stream" in scenarios:
        progress("single-stream")
        run = single_stream(runner, samples, settings)
        run["latencies_ms"] = [round(x, 4) for x in run["latencies_ms"]]
        figures["single-stream"] = run
    if "offline" in scenarios or "server" in scenarios:  # the server's rate search starts from it
        progress("offline")
        figures["offline"] = offline(runner, samples, settings, stack_samples)
    if "server" in scenarios:
        figures["server"] = _server(runner, samples, settings, figures["offline"], progress)
    throughput = figures["offline"]["throughput_samples_per_s"] if "offline" in figures else None
    int8 = is_int8(handle if handle.framework != "torch" else handle.to_onnx())
    result["roofline"] = roofline(result["macs_per_item"], throughput, threads, int8)
    if task is not None and quality:
        progress(f"quality on the {task.eval_split} split")
        measured = task.evaluate(runner)
        result["quality"] = {**measured.to_dict(), "split": task.eval_split,
                             "mlperf": quality_verdict(measured.value, task.baseline)}
    return result


def _server(runner: Any, samples: list[Feeds], settings: ScenarioSettings, offline_run: dict[str, Any],
            progress: Callable[[str], None]) -> dict[str, Any]:
    capacity = offline_run["throughput_samples_per_s"]  # batched: no one-query-at-a-time server beats it
    bound = settings.latency_bound_ms
    if bound is None:
        probe = single_stream(runner, samples, ScenarioSettings(duration_s=0.5, min_queries=50, warmup=5, energy=False,
                                                                seed=settings.seed))
        bound = 10 * probe["p50_ms"]  # MLPerf's server bounds are several times the single-query latency
    rate = settings.target_qps or 0.5 * capacity
    progress(f"server at {rate:.1f} QPS")
    run = server(runner, samples, rate, settings.duration_s, bound, seed=settings.seed)
    run["latency_bound_source"] = "given" if settings.latency_bound_ms else "10 x single-query p50"
    run["target_source"] = "given" if settings.target_qps else "0.5 x offline throughput"
    if settings.search_steps:
        run["search"] = server_search(runner, samples, bound, capacity, settings, progress)
    return run


__all__ = ["MAX_SAMPLES", "for_runtime", "is_int8", "query_samples", "run_bench"]
