"""Measurement: the one place every size, speed, memory and energy figure comes from.

``measure(handle, runtime=...)`` returns a :class:`Measurement` with every figure and
how it was obtained (runtime, threads, batch sizes, query counts, energy method).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from compactai.errors import ParameterError
from compactai.measure.devices import ExecuTorchPlugin, LiteRtPlugin
from compactai.measure.energy import measure_energy
from compactai.measure.environment import environment
from compactai.measure.latency import LatencyStats, measure_latency, measure_throughput
from compactai.measure.memory import measure_peak_memory
from compactai.measure.openvino import OpenVinoRunner
from compactai.measure.runtime import (
    RUNTIME_PLUGINS,
    RUNTIMES,
    OnnxRuntimeRunner,
    Runner,
    RuntimePlugin,
    TorchRunner,
    default_threads,
    installed_runtimes,
    make_runner,
    register_runtime,
    runtime_plugin,
    thread_settings,
)
from compactai.measure.stats import count_macs, fixed_batch, parameter_count, size_on_disk
from compactai.models.handle import ModelHandle

__all__ = [
    "RUNTIMES",
    "RUNTIME_PLUGINS",
    "ExecuTorchPlugin",
    "LatencyStats",
    "LiteRtPlugin",
    "MeasureConfig",
    "Measurement",
    "OnnxRuntimeRunner",
    "OpenVinoRunner",
    "Runner",
    "RuntimePlugin",
    "TorchRunner",
    "batch_feeds",
    "count_macs",
    "default_threads",
    "environment",
    "fixed_batch",
    "installed_runtimes",
    "interleaved_latency",
    "make_runner",
    "measure",
    "measure_energy",
    "measure_latency",
    "measure_peak_memory",
    "measure_throughput",
    "parameter_count",
    "register_runtime",
    "runtime_plugin",
    "size_on_disk",
    "thread_settings",
    "turn_order",
]

# runtimes whose peak memory the subprocess probe (_memprobe.py) knows how to measure
_MEMORY_PROBE_RUNTIMES = ("onnxruntime", "openvino", "torch")


# (field, CLI flag, lowest, highest): bounds that keep a typo from hanging or exhausting the machine
_INT_RANGES = (("min_queries", "--queries", 1, 10_000_000), ("warmup", "warmup", 0, 1_000_000),
               ("throughput_batch", "--batch", 1, 65_536), ("throughput_min_batches", "throughput batches", 1, 1_000_000),
               ("threads", "--threads", 1, 4096))
_FLOAT_RANGES = (("min_seconds", "--seconds", 0.0, 86_400.0), ("core_watts", "--core-watts", 0.0, 10_000.0))


@dataclass
class MeasureConfig:
    """How hard to measure. Defaults follow MLPerf's single-stream spirit at a small scale."""

    min_queries: int = 200
    min_seconds: float = 1.0
    warmup: int = 20
    throughput_batch: int = 32
    throughput_min_batches: int = 10
    memory: bool = True
    energy: bool = True
    core_watts: float = 10.0
    threads: int | None = None
    quality: bool = True

    def check(self) -> None:
        """Raise ParameterError for a setting outside its range (before anything is measured)."""
        for name, flag, low, high in _INT_RANGES:
            value = getattr(self, name)
            if value is None and name == "threads":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ParameterError(f"The '{name}' setting ({flag}) must be a whole number from {low} to {high}; "
                                     f"got {value}.")
        for name, flag, bottom, top in _FLOAT_RANGES:
            number = getattr(self, name)
            if not isinstance(number, (int, float)) or not math.isfinite(number) or not bottom <= number <= top:
                raise ParameterError(f"The '{name}' setting ({flag}) must be a number from {bottom:g} to {top:g}; "
                                     f"got {number}.")
        if self.core_watts <= 0:
            raise ParameterError(f"The 'core_watts' setting (--core-watts) must be positive (watts per busy core, "
                                 f"e.g. 10); got {self.core_watts}.")

    @classmethod
    def quick(cls) -> MeasureConfig:
        """Fewer queries: for tests and for screening search trials."""
        return cls(min_queries=30, min_seconds=0.2, warmup=5, throughput_min_batches=3, memory=False)


@dataclass
class Measurement:
    """Every figure for one model on one runtime, and how it was obtained."""

    runtime: str
    threads: int
    size_bytes: int | None
    params: int | None
    macs: int | None
    latency_p50_ms: float
    latency_p90_ms: float
    latency_p99_ms: float
    latency_mean_ms: float
    latency_queries: int
    latency_batch: int
    throughput_batch: int
    throughput_items_per_s: float
    peak_memory_mb: float | None = None
    model_memory_mb: float | None = None
    energy_mj: float | None = None
    energy_method: str | None = None
    energy_formula: str | None = None
    quality: dict[str, Any] | None = None
    latency_samples_ms: list[float] = field(default_factory=list, repr=False)
    notes: list[str] = field(default_factory=list)
    runtime_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def size_mb(self) -> float | None:
        return None if self.size_bytes is None else self.size_bytes / 1e6

    def to_dict(self, samples: bool = False) -> dict[str, Any]:
        data = asdict(self)
        data["size_mb"] = self.size_mb
        if not samples:
            data.pop("latency_samples_ms")
        return data


def turn_order(count: int, round_number: int) -> list[int]:
    """The order of ``count`` models in round ``round_number`` of interleaved timing: each round
    starts one model further along, so no model is always measured first (or right after the
    slowest)."""
    start = round_number % count
    return [*range(start, count), *range(start)]


def interleaved_latency(
    handles: list[ModelHandle],
    config: MeasureConfig,
    rounds: int,
    progress: Callable[[int], None] = lambda round_number: None,
) -> list[dict[str, Any]]:
    """Batch-1 ONNX Runtime latency of each of ``handles``, measured in ``rounds`` rounds that
    visit every model in turn (load that comes and goes on a shared machine then hits all models
    alike, and :func:`turn_order` rotates who goes first); per model the median p50/p90 over
    rounds and each round's values."""
    import statistics

    rows = fixed_batch(handles[0])
    feeds = batch_feeds({k: v[:rows] for k, v in handles[0].example_inputs.items()}, rows)
    runners = [make_runner(handle, "onnxruntime", config.threads) for handle in handles]
    samples: list[list[tuple[float, float]]] = [[] for _ in handles]
    for round_number in range(rounds):
        progress(round_number)
        for index in turn_order(len(runners), round_number):
            stats = measure_latency(runners[index], feeds, min_queries=config.min_queries, min_seconds=config.min_seconds,
                                    warmup=config.warmup)
            samples[index].append((stats.p50_ms, stats.p90_ms))
    return [{"latency_p50_ms": statistics.median(s[0] for s in values),
             "latency_p90_ms": statistics.median(s[1] for s in values),
             "latency_rounds_ms": [{"p50": p50, "p90": p90} for p50, p90 in values]} for values in samples]


def batch_feeds(example: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """The example inputs repeated (tiled) to ``batch`` rows."""
    out = {}
    for name, value in example.items():
        reps = int(np.ceil(batch / len(value)))
        out[name] = np.concatenate([value] * reps)[:batch]
    return out


def measure(
    handle: ModelHandle,
    task: Any = None,
    *,
    runtime: str = "onnxruntime",
    config: MeasureConfig | None = None,
    feeds: dict[str, np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Measurement:
    """Measure ``handle`` on ``runtime``: size, params, MACs, batch-1 latency, batch-B throughput,
    peak memory (subprocess), energy and, with a task, quality next to the task's baseline."""
    config = config or MeasureConfig()
    config.check()
    threads = config.threads or default_threads()
    say = progress or (lambda message: None)
    runner = make_runner(handle, runtime, threads)
    own_format = handle.framework not in ("torch", "onnx")  # e.g. OpenVINO IR: no ONNX form to count from
    if own_format:
        onnx_handle = None
    else:
        onnx_handle = handle.to_onnx() if runtime != "torch" else (handle._onnx_cache or None)
    rows = fixed_batch(handle)  # 1, unless the model cannot run fewer rows
    single = batch_feeds({k: v[:rows] for k, v in (feeds or handle.example_inputs).items()}, rows)
    throughput_batch = config.throughput_batch if rows == 1 else rows
    say(f"{runtime}: latency at batch {rows}")
    latency = measure_latency(
        runner, single, min_queries=config.min_queries, min_seconds=config.min_seconds, warmup=config.warmup
    )
    say(f"{runtime}: throughput at batch {throughput_batch}")
    throughput, _ = measure_throughput(
        runner, batch_feeds(single, throughput_batch), min_batches=config.throughput_min_batches,
        min_seconds=config.min_seconds / 2,
    )
    if runtime == "torch":
        size = size_on_disk(onnx_handle.path) if onnx_handle is not None and onnx_handle.path else None
    else:
        size = runtime_plugin(runtime).model_size(handle)
    if own_format:
        macs, params = handle.metadata.get("macs"), handle.metadata.get("params")
    else:
        macs = count_macs(handle if handle.module is not None else onnx_handle or handle)
        params = parameter_count(handle if runtime == "torch" else onnx_handle or handle)
    if macs is not None and rows > 1 and handle.module is None and not own_format:
        macs //= rows  # counted on the inferred shapes, i.e. for the whole fixed batch
    result = Measurement(
        runtime=runtime,
        threads=threads,
        size_bytes=size,
        params=params,
        macs=macs,
        latency_p50_ms=latency.p50_ms,
        latency_p90_ms=latency.p90_ms,
        latency_p99_ms=latency.p99_ms,
        latency_mean_ms=latency.mean_ms,
        latency_queries=latency.queries,
        latency_batch=rows,
        throughput_batch=throughput_batch,
        throughput_items_per_s=throughput,
        latency_samples_ms=latency.samples_ms,
        runtime_settings=thread_settings(runner),
    )
    if rows > 1:
        result.notes.append(
            f"the model's inputs fix the batch at {rows}, so it cannot run one item: each timed query (latency, "
            f"energy) runs a batch of {rows}; MACs are per item. Re-export with a dynamic batch axis for batch-1 latency."
        )
    if config.energy:
        def rerun() -> tuple[int, float]:
            again = measure_latency(runner, single, min_queries=50, min_seconds=0.3, warmup=0)
            return again.queries, again.cpu_seconds

        energy = measure_energy(rerun, latency.cpu_seconds, latency.queries, config.core_watts)
        result.energy_mj, result.energy_method, result.energy_formula = (
            energy.millijoules_per_inference, energy.method, energy.formula)
    if config.memory and runtime not in _MEMORY_PROBE_RUNTIMES:
        result.notes.append(f"peak memory not measured on {runtime}: the memory probe runs onnxruntime, openvino and torch only")
    elif config.memory:
        say(f"{runtime}: peak memory in a subprocess")
        memory = measure_peak_memory(handle, runtime, threads)
        if memory is None:
            result.notes.append(f"peak memory not measured on {runtime}: the model could not be saved for a subprocess")
        else:
            result.peak_memory_mb, result.model_memory_mb = memory.peak_mb, memory.model_mb
    if task is not None and config.quality:
        say(f"{runtime}: quality on the {task.eval_split} split")
        result.quality = task.evaluate(runner).to_dict()
    return result
