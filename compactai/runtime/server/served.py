"""One served model: its loaded versions, which one takes traffic, and the probation of a new one.

Versions are loaded side by side. ``route()`` picks the version a request runs on under a lock,
so a switch is atomic: a request runs entirely on the version it was routed to, and its
response names that version. While a new version is on probation it takes the traffic; a
request it gets wrong (an error, a NaN) is answered by the previous version instead, so
clients never see the failure, and the probation's monitor records it.
"""

from __future__ import annotations

import statistics
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compactai.runtime.probation import HealthMonitor
from compactai.runtime.server.batching import Dispatcher, MicroBatcher, RunResult
from compactai.runtime.server.drift_hook import DriftObserver, make_detector
from compactai.runtime.server.models import LoadedVersion
from compactai.runtime.server.protocol import RequestError


@dataclass
class BatchSettings:
    """Micro-batching: off when ``max_batch`` is 1."""

    max_batch: int = 1
    max_delay_ms: float = 2.0


class VersionSlot:
    """A loaded version with its batcher (made on first use, on the event loop) and drift observer."""

    def __init__(self, loaded: LoadedVersion, dispatcher: Dispatcher, batching: BatchSettings,
                 on_drift_alarm: Callable[[str, str, bool, dict[str, Any]], None] | None = None) -> None:
        self.loaded = loaded
        self.dispatcher = dispatcher
        self.batching = batching
        alarm = None if on_drift_alarm is None else (
            lambda on, report: on_drift_alarm(loaded.name, loaded.version, on, report))
        self.drift = DriftObserver(make_detector(loaded.drift_profile()), on_alarm=alarm)
        self._batcher: MicroBatcher | None = None
        # per-request compute ms of recent live requests: the yardstick for the next version's probation
        self.recent_ms: deque[float] = deque(maxlen=256)

    def live_median_ms(self, minimum: int = 20) -> float | None:
        """Median compute time of recent live requests, or None with fewer than ``minimum`` of them."""
        values = list(self.recent_ms)
        return statistics.median(values) if len(values) >= minimum else None

    @property
    def version(self) -> str:
        return self.loaded.version

    async def run(self, feeds: dict[str, np.ndarray]) -> RunResult:
        """Outputs for one request, batched with others when batching is on and the model allows it."""
        if self.batching.max_batch > 1 and self.loaded.batchable:
            if self._batcher is None:
                self._batcher = MicroBatcher(self.loaded.run, self.dispatcher, self.batching.max_batch,
                                             self.batching.max_delay_ms / 1e3)
            return await self._batcher.submit(feeds)
        # unbatched: a lone short request may run on the event loop thread (Dispatcher.can_run_inline)
        outputs, wait, compute = await self.dispatcher.call(self.loaded.run, feeds, inline=True)
        rows = int(next(iter(feeds.values())).shape[0]) if feeds and next(iter(feeds.values())).ndim else 1
        return RunResult(outputs, wait, compute, rows)

    def close(self) -> None:
        """Stop the drift thread. The batcher is left alone: this runs on the update thread, and requests
        still pending in it are dispatched on the event loop (by its timer or a finishing batch)."""
        self.drift.close()


@dataclass
class Probation:
    """A new version watched on its first ``target`` live requests before the agent commits it."""

    candidate: VersionSlot
    previous: VersionSlot | None
    monitor: HealthMonitor
    target: int
    done: threading.Event = field(default_factory=threading.Event)
    closed: bool = False
    answered_by_previous: int = 0

    def record(self, latency_ms: float | None, outputs: list[np.ndarray] | None, error: BaseException | None) -> None:
        if self.closed:
            return
        self.monitor.record(latency_ms, outputs, error=error)
        policy = self.monitor.policy
        failures_allowed_err = policy.max_error_rate * self.target
        failures_allowed_nan = policy.max_nan_rate * self.target
        # stop early once the verdict cannot turn healthy any more: the rollback comes sooner
        if (self.monitor.requests >= self.target or len(self.monitor.errors) > failures_allowed_err
                or self.monitor.nan_requests > failures_allowed_nan):
            self.done.set()


def finite(outputs: list[np.ndarray]) -> bool:
    return all(np.all(np.isfinite(o)) for o in outputs if o.dtype.kind in "fc")


class ServedModel:
    """The versions of one model name and the pointer to the one that takes default traffic."""

    def __init__(self, name: str, dispatcher: Dispatcher, batching: BatchSettings,
                 on_change: Callable[[], None] | None = None,
                 on_drift_alarm: Callable[[str, str, bool, dict[str, Any]], None] | None = None) -> None:
        self.name = name
        self.on_drift_alarm = on_drift_alarm
        self.dispatcher = dispatcher
        self.batching = batching
        self.on_change = on_change or (lambda: None)
        self.versions: dict[str, VersionSlot] = {}
        self.current: str | None = None
        self.probation: Probation | None = None
        self.lock = threading.Lock()

    # ---- routing -----------------------------------------------------------------------------------------
    def route(self, version: str | None) -> tuple[VersionSlot, Probation | None]:
        """The slot a request runs on (and the probation it feeds, if any); RequestError(404) if none."""
        with self.lock:
            if version is not None:
                slot = self.versions.get(version)
                if slot is None:
                    raise RequestError(404, f"Model {self.name!r} has no loaded version {version!r}; loaded: "
                                            f"{sorted(self.versions) or 'none'}.")
                return slot, None
            if self.current is None:
                raise RequestError(404, f"Model {self.name!r} is not loaded; POST /v2/repository/models/"
                                        f"{self.name}/load to load it.")
            probation = self.probation
            slot = self.versions.get(self.current)
            if slot is None:  # cannot happen while current and versions change together under the lock
                raise RequestError(404, f"Model {self.name!r} has no serving version.")
            return slot, probation if probation is not None and probation.candidate is slot else None

    def slot(self, version: str | None = None) -> VersionSlot | None:
        with self.lock:
            key = self.current if version is None else version
            return None if key is None else self.versions.get(key)

    @property
    def ready(self) -> bool:
        return self.current is not None

    def states(self) -> list[tuple[str, str, str, int]]:
        """(model, version, state, size bytes) of every loaded version, for the model-info metric."""
        with self.lock:
            out = []
            for key, slot in self.versions.items():
                state = "standby"
                if key == self.current:
                    state = "probation" if self.probation is not None else "serving"
                out.append((self.name, key, state, slot.loaded.size_bytes))
            return out

    # ---- changes (from the update thread or the repository routes) -------------------------------------
    def install(self, loaded: LoadedVersion) -> VersionSlot:
        """Load ``loaded`` and make it the default at once, dropping the others (start-up, repository load)."""
        slot = VersionSlot(loaded, self.dispatcher, self.batching, self.on_drift_alarm)
        with self.lock:
            self.refuse_during_probation("load")
            old = list(self.versions.values())
            self.versions = {slot.version: slot}
            self.current = slot.version
        for previous in old:
            if previous is not slot:
                previous.close()
        self.on_change()
        return slot

    def unload(self) -> list[str]:
        with self.lock:
            self.refuse_during_probation("unload")
            old, self.versions, self.current = self.versions, {}, None
        for slot in old.values():
            slot.close()
        self.on_change()
        return sorted(old)

    def refuse_during_probation(self, what: str) -> None:
        """RequestError(409) while a new version is on probation (call with ``lock`` held)."""
        if self.probation is not None:
            raise RequestError(409, f"Version {self.probation.candidate.version} of {self.name!r} is on probation; "
                                    f"{what} it after the update is committed or rolled back.")

    def begin_probation(self, loaded: LoadedVersion, monitor: HealthMonitor, target: int) -> Probation:
        """Load the candidate beside the current version and switch default traffic to it atomically."""
        slot = VersionSlot(loaded, self.dispatcher, self.batching, self.on_drift_alarm)
        with self.lock:
            previous = self.versions.get(self.current) if self.current is not None else None
            probation = Probation(slot, previous, monitor, max(1, target))
            self.versions[slot.version] = slot
            self.current, self.probation = slot.version, probation
        self.on_change()
        return probation

    def end_probation(self, probation: Probation, keep: bool) -> None:
        """Commit (drop the previous version) or roll back (switch back, drop the candidate)."""
        with self.lock:
            probation.closed = True
            drop = probation.previous if keep else probation.candidate
            if not keep:
                self.current = probation.previous.version if probation.previous is not None else None
            if drop is not None and self.versions.get(drop.version) is drop:
                del self.versions[drop.version]
            self.probation = None
        if drop is not None:
            drop.close()
        self.on_change()

    def metadata(self, version: str | None) -> dict[str, Any]:
        slot, _ = self.route(version)
        data = slot.loaded.metadata()
        if version is None:
            with self.lock:
                data["versions"] = sorted(self.versions)
        return data
