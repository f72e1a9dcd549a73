"""Zero-downtime updates inside the server: the update agent on a background thread.

Each poll asks the agent (:class:`compactai.runtime.UpdateAgent`) to install the bundle at the
update source without watching it (``watch=False``): the agent fetches, verifies, self-tests and
activates it as a *trial* in its install directory. The server then loads the new version
beside the old one, switches default traffic to it atomically and watches its first live
requests (errors, NaN, latency against the previous version's on the same live traffic) with the
agent's :class:`HealthMonitor`. The agent commits or
rolls back on that verdict; on roll back the old version, still loaded, takes the traffic
again. With no traffic before the probation deadline, synthesized requests complete the
probation, as ``compactai update`` does.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compactai.bundle.manifest import MAX_MANIFEST_BYTES
from compactai.bundle.stage import read_archive_metadata
from compactai.bundle.verify import load_arrays
from compactai.errors import CompactAIError
from compactai.runtime import UpdateAgent, UpdateResult
from compactai.runtime.probation import HealthMonitor, probation_requests
from compactai.runtime.server.metrics import ServerMetrics
from compactai.runtime.server.models import load_installed
from compactai.runtime.server.served import ServedModel


def peek_version(source: str, timeout: float = 10.0) -> int | None:
    """The version an update source *claims* (unverified), to skip polls that cannot bring anything new.

    Only ever used to skip: whatever it returns, the agent verifies everything before installing.
    None when it cannot tell (a .tar archive, a missing or odd manifest); the agent then decides.
    """
    try:
        if source.startswith(("http://", "https://")):
            import httpx

            raw = b""
            with httpx.stream("GET", source.rstrip("/") + "/manifest.json", timeout=timeout) as response:
                if response.status_code == 200:
                    for block in response.iter_bytes(1 << 16):
                        raw += block
                        if len(raw) > MAX_MANIFEST_BYTES:  # endless data: not a manifest, let the agent refuse
                            return None
        elif Path(source).is_file():  # a tar archive: its manifest is read from the stream, size-bounded
            raw = read_archive_metadata(Path(source))[0]
        else:
            path = Path(source) / "manifest.json"
            raw = path.read_bytes()[:MAX_MANIFEST_BYTES] if path.is_file() else b""
        if not raw:
            return -1  # nothing published there yet: nothing to do
        value = json.loads(raw).get("version")
    except Exception:  # noqa: BLE001 (a failed peek only means: let the agent decide)
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class UpdateLoop:
    """Polls ``source`` every ``interval`` seconds and rolls new versions in without downtime."""

    def __init__(self, agent: UpdateAgent, model: ServedModel, source: str, interval: float, *, threads: int,
                 name: str | None, log: Callable[..., Any], metrics: ServerMetrics,
                 probation_requests: int = 20, probation_timeout: float = 60.0,
                 fetch: Callable[[UpdateAgent], UpdateResult] | None = None, peek: bool = True) -> None:
        self.agent = agent
        self.model = model
        self.source = source
        self.interval = interval
        self.threads = threads
        self.name = name
        self.log = log
        self.metrics = metrics
        self.probation_requests = probation_requests
        self.probation_timeout = probation_timeout
        # one attempt (default: the agent's own fetch of ``source``); ``peek`` reads the version a bundle
        # source claims first so that polls that cannot bring anything new stay quiet (a TUF
        # repository answers "current" itself)
        self.fetch = fetch or (lambda agent: agent.update(self.source, watch=False))
        self.peek = peek
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.results: list[UpdateResult] = []

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="compactai-update", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.check_once()
            except Exception as exc:  # noqa: BLE001 (the loop must survive; the error is logged and counted)
                self.metrics.updates.labels(self.model.name, "failed").inc()
                self.log("update", outcome="failed", error=f"{type(exc).__name__}: {exc}"[:300])
            self._stop.wait(self.interval)

    def check_once(self) -> UpdateResult | None:
        """One poll: None when the source has nothing newer, else what the attempt did."""
        if self.peek:
            claimed = peek_version(self.source)
            state = self.agent.state
            if claimed is not None and (claimed <= state.highest_trusted or claimed in state.blocked):
                return None
        try:
            result = self.fetch(self.agent)
        except (CompactAIError, OSError) as exc:
            self.metrics.updates.labels(self.model.name, "failed").inc()
            self.log("update", outcome="failed", source=self.source, error=str(exc).splitlines()[0][:300])
            return None
        if result.status == "current":  # a fleet repository with nothing newer
            return None
        if result.status != "trial" or result.version is None:
            self._finished(result)
            return result
        final = self._probation(result.version)
        final.steps, final.validation = [*result.steps, "probation"], result.validation
        self._finished(final)
        return final

    def _probation(self, version: int) -> UpdateResult:
        root = self.agent.version_dir(version)
        try:
            loaded = load_installed(root, self.threads, self.name)
            loaded.warm_up()
        except Exception as exc:  # noqa: BLE001 (a version that cannot load fails its probation)
            monitor = HealthMonitor(self.agent.probation)
            monitor.record(error=exc)
            return self.agent.finish_probation(monitor)
        monitor = self.agent.begin_probation()
        serving = self.model.slot()
        live = serving.live_median_ms() if serving is not None else None
        if live is not None and monitor.baseline_latency_ms is not None:
            # the agent timed the previous version alone on synthesized inputs; the candidate is timed on live
            # traffic, under the server's load: compare it with the previous version on that same traffic
            monitor.baseline_latency_ms = live
        probation = self.model.begin_probation(loaded, monitor, self.probation_requests)
        self.log("update", outcome="probation", version=loaded.version, watching=probation.target)
        probation.done.wait(self.probation_timeout)
        probation.closed = True  # from here on live requests no longer feed the monitor
        if monitor.requests < self.agent.probation.min_requests or not probation.done.is_set():
            self._synthesized(loaded, monitor, self.probation_requests - monitor.requests)
        if not monitor.verdict()[0]:
            # traffic goes back to the previous version first, then the agent rolls back on disk: once the
            # roll back is recorded, no request is routed to the failed version any more
            self.model.end_probation(probation, keep=False)
            return self.agent.finish_probation(monitor)
        final = self.agent.finish_probation(monitor)
        self.model.end_probation(probation, keep=final.status == "committed")
        return final

    def _synthesized(self, loaded: Any, monitor: HealthMonitor, count: int) -> None:
        """Complete a probation that saw too little traffic with golden and synthesized requests."""
        golden = load_arrays(loaded.root / loaded.manifest["golden"]["inputs"])
        for feeds in probation_requests(loaded.model_path, golden, max(0, count)):
            start = time.perf_counter()
            try:
                outputs = loaded.run({k: np.asarray(v) for k, v in feeds.items()})
                monitor.record((time.perf_counter() - start) * 1e3, outputs)
            except Exception as exc:  # noqa: BLE001 (any failure is a probation failure)
                monitor.record(error=exc)

    def _finished(self, result: UpdateResult) -> None:
        self.results.append(result)
        outcome = {"trial": "committed"}.get(result.status, result.status)
        self.metrics.updates.labels(self.model.name, outcome).inc()
        self.log("update", outcome=outcome, version=result.version, active=result.active, reason=result.reason,
                 message=result.message)
