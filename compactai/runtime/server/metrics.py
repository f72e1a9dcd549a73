"""Telemetry: Prometheus metrics (``compactai_`` prefix, base units) and one JSON log line per event.

The metrics live in the server's own ``CollectorRegistry``; ``GET /metrics`` also appends the
update agent's registry (``compactai_update_events_total``, ``compactai_update_refusals_total``)
and the drift scores, which are read from the drift monitors at scrape time.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# seconds: from 50 microseconds (a tiny model's compute) to 10 s (a remote fallback that hangs)
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class EventLog:
    """One JSON object per line (``time``, ``event``, fields) on a stream, stderr by default."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> dict[str, Any]:
        now = time.time()
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "unix": round(now, 3), "event": event,
                 **fields}
        line = json.dumps(entry, default=str)
        with self._lock:
            stream = self.stream or sys.stderr
            stream.write(line + "\n")
            stream.flush()
        return entry


class DriftCollector(Collector):
    """Drift scores and alarms, read from each loaded version's drift monitor when /metrics is scraped."""

    def __init__(self, reports: Callable[[], Iterable[tuple[str, str, dict[str, Any]]]]) -> None:
        self.reports = reports

    def collect(self) -> Iterable[GaugeMetricFamily]:
        scores = GaugeMetricFamily("compactai_drift_score", "Drift test statistic on the live window, by test",
                                   labels=["model", "version", "test"])
        thresholds = GaugeMetricFamily("compactai_drift_threshold", "Calibrated threshold of each drift test",
                                       labels=["model", "version", "test"])
        alarms = GaugeMetricFamily("compactai_drift_alarm", "1 if the live window has drifted from the reference",
                                   labels=["model", "version"])
        for model, version, report in self.reports():
            for test, value in _numbers(report.get("scores")):
                scores.add_metric([model, version, test], value)
            for test, value in _numbers(report.get("thresholds")):
                thresholds.add_metric([model, version, test], value)
            if "alarm" in report:
                alarms.add_metric([model, version], 1.0 if report["alarm"] else 0.0)
        return [scores, thresholds, alarms]


def _numbers(section: Any) -> list[tuple[str, float]]:
    """(test, value) pairs of a {test: number} mapping; anything else is skipped (the report shape is the
    drift module's to choose)."""
    if not isinstance(section, dict):
        return []
    return [(str(k), float(v)) for k, v in section.items() if isinstance(v, int | float) and not isinstance(v, bool)]


class ServerMetrics:
    """Every metric the server exports, in one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("compactai_requests", "Inference requests by model, version and outcome "
                                "(ok, bad_request, not_found, unauthorized, too_large, nonfinite_output, error)",
                                ["model", "version", "outcome"], registry=r)
        self.request_seconds = Histogram("compactai_request_duration_seconds", "Inference request latency in the "
                                         "server, body read to response", ["model"], buckets=LATENCY_BUCKETS,
                                         registry=r)
        self.compute_seconds = Histogram("compactai_compute_duration_seconds", "ONNX Runtime time per call",
                                         ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("compactai_queue_wait_seconds", "Time a request waited for an inference "
                                       "thread (and for its batch)", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("compactai_batch_size", "Rows per ONNX Runtime call", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        self.in_flight = Gauge("compactai_inflight_requests", "Inference requests being handled", ["model"],
                               registry=r)
        self.model_info = Gauge("compactai_model_info", "Loaded model versions (1 = loaded); state is serving, "
                                "probation or standby", ["model", "version", "runtime", "state"], registry=r)
        self.model_size = Gauge("compactai_model_size_bytes", "Size of each loaded version's model files",
                                ["model", "version"], registry=r)
        self.fallbacks = Counter("compactai_fallback", "Requests handed to the fallback server by reason "
                                 "(confidence, queue, rule) and result (remote, failed)",
                                 ["model", "reason", "result"], registry=r)
        self.updates = Counter("compactai_server_updates", "Update attempts seen by the server by outcome "
                               "(committed, rolled_back, refused, failed)", ["model", "outcome"], registry=r)
        self.probation_fallbacks = Counter("compactai_probation_fallbacks", "Requests the version on probation "
                                           "got wrong (error, NaN) and the previous version answered",
                                           ["model", "version"], registry=r)
        self.extra_registries: list[CollectorRegistry] = []
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: the request path asks for the same few children on
        every request, and ``labels()`` takes a lock and validates each time. Only for metrics that are
        never cleared (not the model-info gauges); the label values are bounded (model name or
        ``_unknown``, loaded versions, a fixed set of outcomes)."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def set_models(self, loaded: Iterable[tuple[str, str, str, int]]) -> None:
        """Replace the model-info gauges with (model, version, state, size bytes) of what is loaded now."""
        self.model_info.clear()
        self.model_size.clear()
        for model, version, state, size in loaded:
            self.model_info.labels(model, version, "onnxruntime", state).set(1)
            self.model_size.labels(model, version).set(size)

    def exposition(self) -> bytes:
        """Prometheus text format of every registry (the server's, then the update agent's)."""
        return b"".join(generate_latest(registry) for registry in [self.registry, *self.extra_registries])
