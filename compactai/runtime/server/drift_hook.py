"""The server's side of drift detection: a small interface over ``compactai.runtime.drift``.

The statistics live in ``compactai.runtime.drift`` (``DriftMonitor.from_profile(profile)``,
``.observe(inputs, outputs)``, ``.report()``); this module only feeds it live traffic and asks
for its report. Observation happens on one background thread with a bounded queue, so drift
statistics never add to a request's latency; when the queue is full, observations are dropped
and counted (the window is a sample of traffic either way).
"""

from __future__ import annotations

import contextlib
import importlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

NO_PROFILE = ("this bundle has no drift profile (bundles made before drift detection, plain .onnx files, or a "
              "build without compactai.runtime.drift): it is served without drift detection")


class DriftDetector(Protocol):
    """What the server needs from a drift monitor."""

    def observe(self, inputs: dict[str, np.ndarray], outputs: list[np.ndarray]) -> None: ...

    def report(self) -> dict[str, Any]: ...


def make_detector(profile: dict[str, Any] | None) -> DriftDetector | None:
    """A detector for a bundle's reference profile, or None without a profile or without the drift module."""
    if profile is None:
        return None
    try:
        module = importlib.import_module("compactai.runtime.drift")
    except ModuleNotFoundError as exc:
        if exc.name != "compactai.runtime.drift":
            raise
        return None
    detector: DriftDetector = module.DriftMonitor.from_profile(profile)
    return detector


class DriftObserver:
    """Feeds a detector from a background thread; ``report()`` answers for ``GET .../drift``."""

    def __init__(self, detector: DriftDetector | None, max_pending: int = 1024,
                 on_alarm: Callable[[bool, dict[str, Any]], None] | None = None, check_every_s: float = 1.0) -> None:
        self.detector = detector
        self.on_alarm = on_alarm
        self.check_every_s = check_every_s
        self.alarm = False
        self._checked = 0.0
        self.dropped = 0
        self.errors = 0
        self._queue: queue.Queue[tuple[dict[str, np.ndarray], list[np.ndarray]] | None] = queue.Queue(max_pending)
        self._lock = threading.Lock()  # observe and report never run at the same time
        self._thread: threading.Thread | None = None
        if detector is not None:
            self._thread = threading.Thread(target=self._work, name="compactai-drift", daemon=True)
            self._thread.start()

    @property
    def enabled(self) -> bool:
        return self.detector is not None

    def observe(self, inputs: dict[str, np.ndarray], outputs: list[np.ndarray]) -> None:
        if self.detector is None:
            return
        try:
            self._queue.put_nowait((inputs, outputs))
        except queue.Full:
            self.dropped += 1

    def _work(self) -> None:
        assert self.detector is not None  # the thread only starts with a detector
        while (item := self._queue.get()) is not None:
            with self._lock:
                try:
                    self.detector.observe(*item)
                    # when caught up (cheap at low traffic), else at most every check_every_s
                    due = self._queue.empty() or time.monotonic() - self._checked >= self.check_every_s
                    if self.on_alarm is not None and due:
                        self._check_alarm()
                except Exception:  # noqa: BLE001 (a drift bug must not stop serving; counted in the report)
                    self.errors += 1

    def _check_alarm(self) -> None:
        """Tell ``on_alarm`` when the alarm turns on or off."""
        assert self.detector is not None and self.on_alarm is not None
        self._checked = time.monotonic()
        report = self.detector.report()
        alarm = bool(report.get("alarm", False))
        if alarm != self.alarm:
            self.alarm = alarm
            self.on_alarm(alarm, report)

    def report(self) -> dict[str, Any] | None:
        """The detector's report plus ``dropped``, or None when there is no drift detection."""
        if self.detector is None:
            return None
        with self._lock:
            report = dict(self.detector.report())
        report.setdefault("dropped_observations", self.dropped)
        report.setdefault("observe_errors", self.errors)
        return report

    def close(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(queue.Full):  # a daemon thread: it ends with the process anyway
                self._queue.put_nowait(None)
