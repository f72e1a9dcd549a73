"""Accuracy-aware mixed precision: the fewest, most sensitive ops stay float until the
quality target is met on the validation split; among the int8 configurations that meet
it, the one with the lowest *measured* batch-1 latency wins.

For each candidate configuration the search quantizes everything, and if that misses
the target it keeps the top-k ops of the sensitivity ranking in float, growing k by
doubling and then bisecting (quality is close to monotone in k), so it needs about
2·log2(ops) evaluations per configuration instead of one per op.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compactai.tasks import Split
from compactai.techniques.quantize._common import Evaluator, LatencyProbe
from compactai.techniques.quantize.ort_ptq import Int8Config, quantize_int8


@dataclass
class Trial:
    """One evaluated candidate: a configuration with ``floats`` ops left in float."""

    config: Int8Config
    floats: int
    quality: float
    details: dict[str, float]
    path: Path
    meets: bool
    latency_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.label(),
            "float_ops": self.floats,
            "quality": self.quality,
            "details": self.details,
            "meets_target": self.meets,
            "latency_p50_ms": self.latency_ms,
        }


@dataclass
class AutoResult:
    chosen: Trial | None
    best: Trial | None  # highest quality seen (what is written when nothing meets the target)
    trials: list[Trial] = field(default_factory=list)
    per_config: list[Trial] = field(default_factory=list)  # the cheapest passing trial per configuration
    complete: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "trials": [t.to_dict() for t in self.trials],
            "candidates": [t.to_dict() for t in self.per_config],
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "chosen_float_ops": list(self.chosen.config.nodes_to_exclude) if self.chosen else [],
            "complete": self.complete,
        }


def search_mixed_precision(
    source: Path,
    configs: list[Int8Config],
    ranking: list[str],
    evaluate: Evaluator,
    meets: Callable[[float, dict[str, float]], bool],
    work_dir: Path,
    *,
    probe: LatencyProbe,
    calibration: Split | None = None,
    max_float_fraction: float = 0.5,
    progress: Callable[[str], None] = lambda message: None,
    deadline: float | None = None,
    rounds: int = 3,
) -> AutoResult:
    """Find, per configuration, the fewest top-ranked float ops that meet the target; pick by latency."""
    names = evaluate.handle.input_names
    limit = max(1, int(len(ranking) * max_float_fraction))
    result = AutoResult(None, None)
    counter = 0

    def run(config: Int8Config, floats: int) -> Trial:
        nonlocal counter
        counter += 1
        path = work_dir / f"auto-{counter:03d}.onnx"
        candidate = config.excluding(list(config.nodes_to_exclude) + ranking[:floats])
        progress(f"auto: {candidate.label()}")
        quantize_int8(source, path, candidate, calibration, names)
        quality = evaluate(path)
        trial = Trial(
            candidate, floats, quality.value, quality.details, path, meets(quality.value, quality.details)
        )
        result.trials.append(trial)
        if result.best is None or trial.quality > result.best.quality:
            result.best = trial
        return trial

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() > deadline

    for config in configs:
        if out_of_time():
            result.complete = False
            break
        passing = None
        low, high = -1, None  # largest k known to fail, smallest k known to pass
        k = 0
        while k <= limit and not out_of_time():
            trial = run(config, k)
            if trial.meets:
                passing, high = trial, k
                break
            low = k
            if k >= limit:
                break
            k = 1 if k == 0 else min(k * 2, limit)
        while passing is not None and high is not None and high - low > 1 and not out_of_time():
            middle = (low + high) // 2
            trial = run(config, middle)
            if trial.meets:
                passing, high = trial, middle
            else:
                low = middle
        if passing is not None:
            result.per_config.append(passing)
            progress(f"auto: {passing.config.label()} meets the target with {passing.floats} op(s) in float")
    if result.per_config:
        measure_interleaved(result.per_config, lambda t: probe(evaluate.handle.as_onnx(t.path)), rounds, progress)
        result.chosen = pick(result.per_config)
    keep = {t.path for t in (result.chosen, result.best) if t is not None}
    for trial in result.trials:
        if trial.path not in keep:
            trial.path.unlink(missing_ok=True)
    return result


TIE = 1.05  # batch-1 latencies this close are within the noise of a shared machine (docs/quantization.md)


def pick(passing: list[Trial]) -> Trial:
    """The fastest passing trial, where a difference within ``TIE`` is no difference: among those,
    the one with fewer float ops (smaller, more int8), then the higher validation quality (more
    margin over the target), then the faster."""
    fastest = min(t.latency_ms or float("inf") for t in passing)
    close = [t for t in passing if (t.latency_ms or float("inf")) <= fastest * TIE]
    return min(close, key=lambda t: (t.floats, -t.quality, t.latency_ms or float("inf")))


def measure_interleaved(
    trials: list[Trial], latency: Callable[[Trial], float], rounds: int, progress: Callable[[str], None]
) -> None:
    """Set each trial's latency to the median of ``rounds`` probes taken in alternation, so that
    load that comes and goes on the machine hits every candidate alike."""
    import statistics

    samples: dict[int, list[float]] = {id(t): [] for t in trials}
    for round_number in range(max(1, rounds) if len(trials) > 1 else 1):
        progress(f"auto: measuring {len(trials)} candidate(s), round {round_number + 1}")
        for trial in trials:
            samples[id(trial)].append(float(latency(trial)))
    for trial in trials:
        trial.latency_ms = statistics.median(samples[id(trial)])
        progress(f"auto: {trial.config.label()}: {trial.latency_ms:.2f} ms p50 at batch 1")

