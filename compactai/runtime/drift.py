"""Drift detection while serving: a sliding window of live traffic compared with the bundle's
reference profile (the statistics and the profile itself are in compactai.measure.drift).

    monitor = DriftMonitor.from_bundle(bundle_dir)       # or from_profile(profile_dict_or_path_or_None)
    monitor.observe({"image": batch}, [logits])          # after each inference; thread-safe
    monitor.report()                                     # scores, thresholds, alarm (JSON-ready)

The window holds the features of the last ``window`` samples, not the raw requests, so
``observe`` does one small projection per request and ``report`` runs the tests. A bundle made
before drift detection has no profile; its monitor reports ``enabled: false`` and why.
"""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from compactai.measure.drift import (
    PROFILE_FILE,
    build_profile,
    load_profile,
    window_features,
    window_scores,
    with_arrays,
)

__all__ = ["PROFILE_FILE", "DriftMonitor", "build_profile"]

NO_PROFILE = "this bundle has no drift profile (made before drift detection)"


class DriftMonitor:
    """Keeps the last ``window`` samples' features and reports drift against a reference profile."""

    def __init__(self, profile: dict[str, Any] | None, reason: str = NO_PROFILE) -> None:
        self.profile = with_arrays(profile) if profile is not None else None
        self.reason = reason
        self.window = int(self.profile["window"]) if self.profile else 0
        self._rows: deque[tuple[np.ndarray, ...]] = deque(maxlen=max(self.window, 1))
        self._lock = threading.Lock()
        self._seen = 0
        self._skipped = 0
        self._skip_reason: str | None = None
        self._cached: tuple[int, dict[str, Any]] | None = None

    @classmethod
    def from_profile(cls, profile: dict[str, Any] | str | Path | None) -> DriftMonitor:
        """A monitor for a profile dict (from build_profile), a drift_profile.json path, or None
        (a bundle without a profile: the monitor is disabled and says why)."""
        if profile is None:
            return cls(None)
        if isinstance(profile, (str, Path)):
            return cls(load_profile(profile))
        return cls(profile)

    @classmethod
    def from_bundle(cls, root: str | Path) -> DriftMonitor:
        """The monitor for an extracted, verified bundle directory (disabled if it has no profile)."""
        path = Path(root) / PROFILE_FILE
        return cls.from_profile(path if path.is_file() else None)

    @property
    def enabled(self) -> bool:
        return self.profile is not None

    def observe(self, inputs: dict[str, np.ndarray], outputs: list[np.ndarray]) -> None:
        """Add one request's samples (first axis) to the window. Never raises on odd traffic: samples
        whose features cannot be computed (a missing input, another shape) are counted as skipped."""
        if self.profile is None:
            return
        try:
            features = window_features(self.profile, inputs, outputs)
            count = {len(rows) for rows in features}
            if len(count) != 1:
                raise ValueError(f"inputs and outputs disagree on the batch size ({sorted(count)})")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            batch = len(next(iter(inputs.values()))) if inputs else 0
            with self._lock:
                self._skipped += int(batch)
                self._skip_reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return
        samples = list(zip(*features))
        with self._lock:
            self._rows.extend(samples)
            self._seen += len(samples)

    def reset(self) -> None:
        """Forget the window (e.g. after a model update: the new version has its own profile)."""
        with self._lock:
            self._rows.clear()
            self._cached = None

    def report(self) -> dict[str, Any]:
        """Scores, thresholds, window fill, samples seen, alarm and per-test detail (plain JSON data).
        Tests run only on a full window: the thresholds were calibrated for windows of that size."""
        if self.profile is None:
            return {"enabled": False, "reason": self.reason}
        with self._lock:
            seen, skipped, skip_reason = self._seen, self._skipped, self._skip_reason
            if self._cached is not None and self._cached[0] == seen:
                return dict(self._cached[1])  # a copy: callers may add their own keys
            rows = list(self._rows)
        profile = self.profile
        report: dict[str, Any] = {
            "enabled": True, "kind": profile["kind"], "window": self.window, "samples_in_window": len(rows),
            "samples_seen": seen, "samples_skipped": skipped, "alpha": profile["alpha"],
            "ready": len(rows) >= self.window, "alarm": False,
            "thresholds": {spec["name"]: spec["threshold"] for spec in profile["tests"]}, "scores": {}, "tests": [],
        }
        if skip_reason:
            report["skip_reason"] = skip_reason
        if not report["ready"]:
            report["reason"] = f"warming up: {len(rows)} of {self.window} samples in the window"
        else:
            windows = [np.stack(column) for column in zip(*rows)]
            for spec, (score, detail) in zip(profile["tests"], window_scores(profile, windows)):
                alarm = bool(score > spec["threshold"])
                report["scores"][spec["name"]] = float(score)
                report["alarm"] = report["alarm"] or alarm
                report["tests"].append({"name": spec["name"], "test": spec["test"], "target": spec["target"],
                                        "score": float(score), "threshold": spec["threshold"], "alarm": alarm,
                                        "detail": detail})
        with self._lock:
            self._cached = (seen, report)
        return dict(report)
