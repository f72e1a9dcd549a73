"""Latency and throughput, MLPerf-style: warm up, then at least N queries and T seconds."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from compactai.measure.runtime import Runner


@dataclass
class LatencyStats:
    """Per-query latency figures in milliseconds, plus how they were obtained."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    queries: int
    seconds: float
    cpu_seconds: float
    samples_ms: list[float]


def measure_latency(
    runner: Runner,
    feeds: dict[str, np.ndarray],
    *,
    min_queries: int = 200,
    min_seconds: float = 1.0,
    warmup: int = 20,
    max_seconds: float = 60.0,
    progress: Callable[[int], None] | None = None,
) -> LatencyStats:
    """Single-stream latency: run ``feeds`` back to back until both minimums are reached."""
    import resource

    timed = getattr(runner, "timed_samples", None)
    if callable(timed):  # a runner in another process (LiteRT, ExecuTorch) times itself: no pipe in the figure
        seconds, cpu = timed(feeds, warmup=warmup, queries=min_queries, seconds=min_seconds, max_seconds=max_seconds)
        return _stats(np.array(seconds), float(np.sum(seconds)), cpu)
    for _ in range(warmup):
        runner.run(feeds)
    samples: list[float] = []
    usage_start = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    elapsed = 0.0
    while len(samples) < min_queries or elapsed < min_seconds:
        t0 = time.perf_counter()
        runner.run(feeds)
        samples.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
        if progress is not None and len(samples) % 50 == 0:
            progress(len(samples))
        if elapsed > max_seconds and len(samples) >= 10:
            break
    usage_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage_end.ru_utime - usage_start.ru_utime) + (usage_end.ru_stime - usage_start.ru_stime)
    return _stats(np.array(samples), elapsed, cpu)


def _stats(seconds: np.ndarray, elapsed: float, cpu: float) -> LatencyStats:
    ms = seconds * 1e3
    return LatencyStats(
        p50_ms=float(np.percentile(ms, 50)),
        p90_ms=float(np.percentile(ms, 90)),
        p99_ms=float(np.percentile(ms, 99)),
        mean_ms=float(ms.mean()),
        queries=len(ms),
        seconds=float(elapsed),
        cpu_seconds=float(cpu),
        samples_ms=[round(float(x), 4) for x in ms],
    )


def measure_throughput(
    runner: Runner,
    feeds: dict[str, np.ndarray],
    *,
    min_batches: int = 10,
    min_seconds: float = 1.0,
    warmup: int = 2,
    max_seconds: float = 60.0,
) -> tuple[float, LatencyStats]:
    """Offline throughput: items per second running a whole batch per query."""
    batch = len(next(iter(feeds.values())))
    stats = measure_latency(
        runner, feeds, min_queries=min_batches, min_seconds=min_seconds, warmup=warmup, max_seconds=max_seconds
    )
    return batch / (stats.mean_ms / 1e3), stats
