"""Probation: watch a freshly activated version on real requests before committing to it.

A :class:`HealthMonitor` collects one record per request (latency, outputs or the error) and
gives a verdict: unhealthy on any error, any NaN/Inf output, or a median latency far above the
previous version's. A server feeds it its real requests; ``compactai update`` alone feeds it
the golden inputs plus inputs synthesized from the model's signature.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ProbationPolicy:
    """When a version on probation is healthy. ``max_latency_ratio`` None disables the latency check."""

    queries: int = 20  # synthesized requests when no real ones are given (golden inputs run too)
    max_error_rate: float = 0.0
    max_nan_rate: float = 0.0
    max_latency_ratio: float | None = 5.0  # p50 of the new version / p50 of the previous one
    min_latency_increase_ms: float = 1.0  # and slower by at least this much (tiny models' ratios are noise)
    min_requests: int = 1
    # probations of one trial in all: one interrupted by a kill is run again at the next start, but
    # a version whose probation kills the process every time is rolled back after this many
    max_attempts: int = 3


@dataclass
class HealthMonitor:
    """Per-request records of a version on probation, and the verdict on them."""

    policy: ProbationPolicy
    baseline_latency_ms: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    nan_requests: int = 0

    @property
    def requests(self) -> int:
        return len(self.latencies_ms) + len(self.errors)

    def record(self, latency_ms: float | None = None, outputs: Iterable[np.ndarray] | None = None,
               error: BaseException | str | None = None) -> None:
        """One request: its latency and outputs, or the error it raised."""
        if error is not None:
            self.errors.append(str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
            return
        self.latencies_ms.append(float(latency_ms or 0.0))
        if outputs is not None and any(not np.all(np.isfinite(np.asarray(o))) for o in outputs
                                       if np.asarray(o).dtype.kind in "fc"):
            self.nan_requests += 1

    def verdict(self) -> tuple[bool, str]:
        """(healthy, reason): the reason names the failing figure and its threshold."""
        n = self.requests
        if n < self.policy.min_requests:
            return False, f"only {n} request(s) seen in probation, {self.policy.min_requests} needed"
        if len(self.errors) / n > self.policy.max_error_rate:
            return False, f"{len(self.errors)} of {n} requests failed (first: {self.errors[0]})"
        if self.nan_requests / n > self.policy.max_nan_rate:
            return False, f"{self.nan_requests} of {n} requests returned NaN/Inf outputs"
        if self.policy.max_latency_ratio is not None and self.baseline_latency_ms and self.latencies_ms:
            median = statistics.median(self.latencies_ms)
            ratio = median / self.baseline_latency_ms
            increase = median - self.baseline_latency_ms
            if ratio > self.policy.max_latency_ratio and increase > self.policy.min_latency_increase_ms:
                return False, (f"median latency is {ratio:.1f}x the previous version's, above the "
                               f"{self.policy.max_latency_ratio}x allowed")
        return True, f"{n} requests, no errors or NaNs"


class OnnxModel:
    """One ONNX Runtime session on an installed version's model (1 intra-op thread by default)."""

    def __init__(self, path: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def timed_run(self, feeds: dict[str, np.ndarray]) -> tuple[float, list[np.ndarray]]:
        start = time.perf_counter()
        outputs = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        return (time.perf_counter() - start) * 1e3, list(outputs)


def probation_requests(model_path: Path, golden: dict[str, np.ndarray], count: int) -> list[dict[str, np.ndarray]]:
    """The golden inputs, then ``count`` inputs synthesized from the model's signature (new seeds)."""
    from compactai.models.load import load_onnx, synthesize_inputs

    handle = load_onnx(model_path)
    return [golden] + [synthesize_inputs(handle.inputs, batch=1, seed=1 + i) for i in range(count)]


def median_latency_ms(model: OnnxModel, requests: list[dict[str, np.ndarray]]) -> float | None:
    """The previous version's median latency on the same requests (the latency yardstick)."""
    latencies = []
    for feeds in [requests[0], *requests]:  # the first run warms the session up and is dropped
        try:
            latencies.append(model.timed_run(feeds)[0])
        except Exception:  # noqa: BLE001 (best effort: any failure means "not available")
            return None
    return statistics.median(latencies[1:]) if len(latencies) > 1 else None
