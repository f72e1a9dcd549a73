"""Update events: a JSONL log on disk and Prometheus counters in a private registry.

Every refusal, activation, commit and rollback is appended to ``events.jsonl`` (flushed and
fsync'ed, so the record survives a crash) and counted. The counters live in their own
``CollectorRegistry`` so a server can expose them (``prometheus_client.generate_latest``)
without clashing with other metrics.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter


class UpdateEvents:
    """Append-only event log plus counters: ``refusals{reason}`` and ``events{event}``."""

    def __init__(self, path: Path, registry: CollectorRegistry | None = None) -> None:
        self.path = path
        self.registry = registry or CollectorRegistry()
        self._refusals = Counter("compactai_update_refusals", "Bundles refused by the update agent, by reason",
                                 ["reason"], registry=self.registry)
        self._events = Counter("compactai_update_events", "Update agent events (activated, committed, "
                               "rolled_back, ...)", ["event"], registry=self.registry)

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Log and count one event; ``event == "refused"`` also counts under ``fields['reason']``."""
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "event": event, **fields}
        self._events.labels(event=event).inc()
        if event == "refused":
            self._refusals.labels(reason=str(fields.get("reason", "unknown"))).inc()
        with self.path.open("a") as stream:
            stream.write(json.dumps(entry, default=str) + "\n")
            stream.flush()
            os.fsync(stream.fileno())
        return entry

    def counters(self) -> dict[str, dict[str, float]]:
        """{"refusals": {reason: n}, "events": {event: n}} for this process."""
        result: dict[str, dict[str, float]] = {"refusals": {}, "events": {}}
        for metric in self.registry.collect():
            key = "refusals" if metric.name == "compactai_update_refusals" else "events"
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    label = sample.labels.get("reason") or sample.labels.get("event") or ""
                    result[key][label] = sample.value
        return result

    def read(self) -> list[dict[str, Any]]:
        """Every event logged so far (across restarts)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
