"""MLPerf Inference scenarios on one runner: single-stream, offline and server.

The definitions follow MLPerf Inference's rules and LoadGen (github.com/mlcommons/inference,
``loadgen/``): *single-stream* issues the next query when the previous one completes and reports
the 90th percentile with LoadGen's early-stopping estimate; *offline* hands every sample over at
once and reports throughput; *server* issues queries at Poisson arrival times at a target rate and
reports the 99th percentile of the latency from each query's scheduled arrival to its completion.

The defaults here finish in about a minute. They are far below MLPerf's minimums
(:data:`MLPERF_MINIMUMS`), which every result prints next to its own figures: these are
engineering measurements, never a submission.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from compactai.errors import ParameterError
from compactai.measure.energy import DEFAULT_CORE_WATTS, measure_energy
from compactai.measure.runtime import Runner

Feeds = dict[str, np.ndarray]

# MLPerf Inference (datacenter/edge rules, LoadGen defaults): every scenario runs at least 600 s;
# single-stream at least 1024 queries, server at least 270,336 queries, offline at least 24,576
# samples in its one query. Early stopping may end a long-enough run with fewer queries.
MLPERF_MINIMUMS: dict[str, dict[str, Any]] = {
    "single-stream": {"min_duration_s": 600, "min_queries": 1024, "percentile": 90},
    "offline": {"min_duration_s": 600, "min_samples": 24_576},
    "server": {"min_duration_s": 600, "min_queries": 270_336, "percentile": 99},
}
EARLY_STOPPING_CONFIDENCE = 0.99  # LoadGen's confidence, with tolerance 0
SCENARIOS = ("single-stream", "offline", "server")


@dataclass
class ScenarioSettings:
    """How long and how hard one scenario runs (defaults: about a minute on this machine)."""

    duration_s: float = 10.0
    min_queries: int = 1024
    warmup: int = 20
    offline_batch: int = 32
    target_qps: float | None = None  # server: None = a fraction of the offline throughput
    latency_bound_ms: float | None = None  # server: None = 10x the single-query p50
    search_steps: int = 6
    search_duration_s: float = 3.0
    seed: int = 0
    core_watts: float = DEFAULT_CORE_WATTS  # energy estimate without RAPL
    energy: bool = True

    def check(self) -> None:
        """Raise ParameterError for a setting out of range, before anything runs."""
        for name, flag, value, low, high in (
            ("duration_s", "--duration", self.duration_s, 0.01, 86_400.0),
            ("search_duration_s", "--search-duration", self.search_duration_s, 0.01, 86_400.0),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and low <= value <= high):
                raise ParameterError(f"The '{name}' setting ({flag}) must be seconds from {low:g} to {high:g}; "
                                     f"got {value}.")
        for name, flag, count, lowest, highest in (
            ("min_queries", "--min-queries", self.min_queries, 1, 10_000_000),
            ("warmup", "--warmup", self.warmup, 0, 1_000_000),
            ("offline_batch", "--batch", self.offline_batch, 1, 65_536),
            ("search_steps", "--search-steps", self.search_steps, 0, 50),
        ):
            if isinstance(count, bool) or not isinstance(count, int) or not lowest <= count <= highest:
                raise ParameterError(f"The '{name}' setting ({flag}) must be a whole number from {lowest} to "
                                     f"{highest}; got {count}.")
        for name, flag, rate in (("target_qps", "--target-qps", self.target_qps),
                                 ("latency_bound_ms", "--latency-bound-ms", self.latency_bound_ms)):
            if rate is not None and not (math.isfinite(rate) and 0 < rate <= 1e7):
                raise ParameterError(f"The '{name}' setting ({flag}) must be a positive number; got {rate}.")


# ---- early stopping (LoadGen's binomial test, written from its description) --------------------


@lru_cache(maxsize=4096)
def min_passing_queries(overlatency: int, percentile: float, confidence: float = EARLY_STOPPING_CONFIDENCE) -> int:
    """The fewest queries under the latency bound (h) such that, with ``overlatency`` (t) queries
    over it, a run of h + t queries shows with ``confidence`` that the ``percentile`` latency is
    within the bound: the smallest h with P(Binomial(h + t, 1 - p) <= t) < 1 - c."""
    from scipy.stats import binom

    p = percentile / 100 if percentile > 1 else percentile

    def odds(h: int) -> float:
        return float(binom.cdf(overlatency, h + overlatency, 1 - p))

    low, high = 1, max(2, math.ceil(math.log(1 - confidence) / math.log(p)))
    while odds(high) >= 1 - confidence:  # grow the bracket, then bisect
        low, high = high, high * 2
    while low < high:
        middle = (low + high) // 2
        if odds(middle) < 1 - confidence:
            high = middle
        else:
            low = middle + 1
    return low


def early_stopping_estimate(latencies_ms: Sequence[float], percentile: float,
                            confidence: float = EARLY_STOPPING_CONFIDENCE) -> dict[str, Any]:
    """LoadGen's single-stream early-stopping estimate of the ``percentile`` latency.

    With n queries sorted ascending, t is the largest count >= 1 with min_passing_queries(t) + t <= n,
    and the estimate is the latency at 0-based index n - t (the t-th largest). Returns
    {"estimate_ms", "overlatency_queries", "queries", "min_queries"}; the estimate is None when
    n < min_passing_queries(1) + 1 (``min_queries``), which MLPerf reports as too few queries.
    """
    ordered = sorted(latencies_ms)
    n = len(ordered)
    needed = min_passing_queries(1, percentile, confidence) + 1
    result: dict[str, Any] = {"percentile": percentile, "confidence": confidence, "queries": n,
                              "min_queries": needed, "estimate_ms": None, "overlatency_queries": None}
    if n < needed:
        return result
    t = 1
    while min_passing_queries(t + 1, percentile, confidence) + t + 1 <= n:
        t += 1
    result.update(estimate_ms=float(ordered[n - t]), overlatency_queries=t)
    return result


def server_early_stopping(latencies_ms: Sequence[float], bound_ms: float, percentile: float = 99.0,
                          confidence: float = EARLY_STOPPING_CONFIDENCE) -> dict[str, Any]:
    """LoadGen's server check: t queries over the bound need at least min_passing_queries(t) + t
    queries in all for the run to show the ``percentile`` within the bound."""
    overlatency = sum(1 for x in latencies_ms if x > bound_ms)
    needed = min_passing_queries(overlatency, percentile, confidence) + overlatency
    return {"overlatency_queries": overlatency, "queries": len(latencies_ms), "min_queries": needed,
            "passed": len(latencies_ms) >= needed}


def percentiles(latencies_ms: Sequence[float]) -> dict[str, float]:
    values = np.asarray(latencies_ms, dtype=np.float64)
    return {"p50_ms": float(np.percentile(values, 50)), "p90_ms": float(np.percentile(values, 90)),
            "p99_ms": float(np.percentile(values, 99)), "mean_ms": float(values.mean()),
            "max_ms": float(values.max())}


# ---- the scenarios -----------------------------------------------------------------------------


def _order(count: int, queries: int, seed: int) -> np.ndarray:
    """Which sample each query uses: a seeded random draw from the sample set, as LoadGen's QSL."""
    return np.random.default_rng(seed).integers(0, count, size=queries)


def single_stream(runner: Runner, samples: Sequence[Feeds], settings: ScenarioSettings,
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Issue one query, wait for it, issue the next: until both the duration and the query count
    are reached. Latency percentiles plus the early-stopping p90 (and p99) estimates."""
    for i in range(settings.warmup):
        runner.run(samples[i % len(samples)])
    order = _order(len(samples), max(settings.min_queries, 1) * 4, settings.seed)
    latencies: list[float] = []
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = clock()
    while len(latencies) < settings.min_queries or clock() - start < settings.duration_s:
        feeds = samples[int(order[len(latencies) % len(order)])]
        t0 = clock()
        runner.run(feeds)
        latencies.append((clock() - t0) * 1e3)
    elapsed = clock() - start
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = used.ru_utime - usage.ru_utime + used.ru_stime - usage.ru_stime

    def rerun() -> tuple[int, float]:  # RAPL, when present, reads the counters around a fresh run
        again = single_stream(runner, samples, ScenarioSettings(duration_s=0.2, min_queries=50, warmup=0,
                                                                       energy=False))
        return again["queries"], again["cpu_seconds"]

    energy = measure_energy(rerun, cpu_seconds, len(latencies), settings.core_watts) if settings.energy else None
    return {"scenario": "single-stream", "queries": len(latencies), "seconds": elapsed, "cpu_seconds": cpu_seconds,
            "energy_mj": energy and energy.millijoules_per_inference, "energy_method": energy and energy.method,
            "energy_formula": energy and energy.formula,
            **percentiles(latencies),
            "early_stopping_p90": early_stopping_estimate(latencies, 90),
            "early_stopping_p99": early_stopping_estimate(latencies, 99),
            "latencies_ms": latencies}


def offline(runner: Runner, samples: Sequence[Feeds], settings: ScenarioSettings,
            stack: Callable[[Sequence[Feeds]], Feeds]) -> dict[str, Any]:
    """Every sample available at once: run them in batches of ``offline_batch`` until the duration
    and ``min_queries`` samples are reached; throughput = samples / seconds."""
    batch = settings.offline_batch
    order = _order(len(samples), batch * 64, settings.seed)
    batches = [stack([samples[int(j)] for j in order[i:i + batch]]) for i in range(0, len(order), batch)]
    for i in range(max(1, settings.warmup // 10)):
        runner.run(batches[i % len(batches)])
    done, start = 0, time.perf_counter()
    while done < settings.min_queries or time.perf_counter() - start < settings.duration_s:
        runner.run(batches[(done // batch) % len(batches)])
        done += batch
    elapsed = time.perf_counter() - start
    return {"scenario": "offline", "samples": done, "batch": batch, "seconds": elapsed,
            "throughput_samples_per_s": done / elapsed}


def poisson_schedule(rate: float, duration_s: float, seed: int) -> np.ndarray:
    """Arrival times (s) of a Poisson process at ``rate`` on [0, duration), conditioned on exactly
    round(rate x duration) arrivals: sorted uniform times. The gaps are those of a Poisson process
    and the offered rate is exactly ``rate``, so only the system can move the achieved rate."""
    count = max(2, round(rate * duration_s))
    return np.sort(np.random.default_rng(seed).uniform(0.0, duration_s, size=count))


def server(runner: Runner, samples: Sequence[Feeds], rate: float, duration_s: float, bound_ms: float,
           seed: int = 0) -> dict[str, Any]:
    """Queries arrive at Poisson times at ``rate``; one worker serves them first come first
    served. A query's latency runs from its scheduled arrival to its completion, so time spent
    queued behind earlier queries counts, as in LoadGen."""
    schedule = poisson_schedule(rate, duration_s, seed)
    order = _order(len(samples), len(schedule), seed + 1)
    latencies: list[float] = []
    start = time.perf_counter()
    for arrival, index in zip(schedule, order):
        wait = start + arrival - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        runner.run(samples[int(index)])
        latencies.append((time.perf_counter() - start - arrival) * 1e3)
    finished = time.perf_counter() - start
    # issued queries over the span from the first arrival to the last completion
    achieved = (len(schedule) - 1) / max(finished - float(schedule[0]), 1e-9)
    offered = (len(schedule) - 1) / max(float(schedule[-1] - schedule[0]), 1e-9)
    figures = percentiles(latencies)
    return {"scenario": "server", "target_qps": rate, "offered_qps": offered, "achieved_qps": achieved,
            "achieved_ratio": achieved / rate, "queries": len(latencies), "seconds": finished,
            "latency_bound_ms": bound_ms, **figures, "meets_bound": figures["p99_ms"] <= bound_ms,
            "early_stopping": server_early_stopping(latencies, bound_ms)}


def server_search(runner: Runner, samples: Sequence[Feeds], bound_ms: float, high_qps: float,
                  settings: ScenarioSettings, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """The highest Poisson rate whose p99 meets ``bound_ms``: bisection between 0 and ``high_qps``
    (e.g. the offline throughput, which no single-query server can beat) over ``search_steps``
    short runs; returns the best passing rate found and every rate tried."""
    low, high, best = 0.0, high_qps, None
    tried = []
    for step in range(settings.search_steps):
        rate = (low + high) / 2
        progress(f"server search {step + 1}/{settings.search_steps}: {rate:.1f} QPS")
        run = server(runner, samples, rate, settings.search_duration_s, bound_ms, seed=settings.seed + 100 + step)
        tried.append({k: run[k] for k in ("target_qps", "achieved_qps", "p99_ms", "meets_bound", "queries")})
        if run["meets_bound"]:
            low, best = rate, rate
        else:
            high = rate
    return {"max_qps_within_bound": best, "latency_bound_ms": bound_ms, "upper_qps": high_qps,
            "steps": tried, "resolution_qps": high - low}


def quality_verdict(value: float | None, reference: float | None) -> dict[str, Any]:
    """MLPerf's accuracy rule: quality at least 99% (or 99.9% for the high-accuracy variant) of
    the fp32 reference's."""
    if value is None or reference is None:
        return {"value": value, "reference": reference, "ratio": None, "pass_99": None, "pass_99_9": None}
    ratio = value / reference if reference else None
    return {"value": value, "reference": reference, "ratio": ratio,
            "pass_99": value >= 0.99 * reference, "pass_99_9": value >= 0.999 * reference}


def stack_samples(samples: Sequence[Feeds]) -> Feeds:
    """One batch from single-row samples; token inputs of different lengths are right-padded
    with zeros (an attention mask of 0 there keeps the padding out of the result)."""
    names = list(samples[0])
    out: Feeds = {}
    for name in names:
        rows = [s[name] for s in samples]
        if rows[0].ndim >= 2 and len({r.shape[1:] for r in rows}) > 1:
            width = max(r.shape[1] for r in rows)
            rows = [np.pad(r, [(0, 0), (0, width - r.shape[1])] + [(0, 0)] * (r.ndim - 2)) for r in rows]
        out[name] = np.concatenate(rows)
    return out


__all__ = ["EARLY_STOPPING_CONFIDENCE", "MLPERF_MINIMUMS", "SCENARIOS", "ScenarioSettings", "early_stopping_estimate",
           "min_passing_queries", "offline", "percentiles", "poisson_schedule", "quality_verdict", "server",
           "server_early_stopping", "server_search", "single_stream", "stack_samples"]
