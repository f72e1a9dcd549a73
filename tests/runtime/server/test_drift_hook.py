"""The server's drift hook: a bundle with a signed drift profile is watched on live traffic, one without says so.

The statistics belong to ``compactai.runtime.drift``; these tests check the hook's side of the
contract (``DriftMonitor.from_profile(profile)``, ``observe(inputs, outputs)``, ``report()``) with a
small recording monitor put in that module's place, so they hold with or without the real module.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from compactai.runtime.server.drift_hook import NO_PROFILE
from tests.runtime.server.conftest import events, infer_body, wait_for


class RecordingMonitor:
    """Counts rows; alarms once it has seen a row whose first value is above the profile's limit."""

    instances: list[RecordingMonitor] = []

    def __init__(self, profile: dict[str, Any]) -> None:
        self.profile, self.rows, self.alarm = profile, 0, False
        RecordingMonitor.instances.append(self)

    @classmethod
    def from_profile(cls, profile: dict[str, Any] | None) -> RecordingMonitor:
        assert profile is not None
        return cls(profile)

    def observe(self, inputs: dict[str, np.ndarray], outputs: list[np.ndarray]) -> None:
        assert outputs[0].shape[0] == inputs["x"].shape[0]
        self.rows += int(inputs["x"].shape[0])
        self.alarm = self.alarm or bool((inputs["x"][:, 0] > self.profile["limit"]).any())

    def report(self) -> dict[str, Any]:
        return {"window": 4, "samples_seen": self.rows, "alarm": self.alarm,
                "scores": {"first_value": float(self.alarm)}, "thresholds": {"first_value": 0.5}}


@pytest.fixture
def drift_module(monkeypatch: pytest.MonkeyPatch) -> type[RecordingMonitor]:
    module = types.ModuleType("compactai.runtime.drift")
    module.DriftMonitor = RecordingMonitor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "compactai.runtime.drift", module)
    RecordingMonitor.instances.clear()
    return RecordingMonitor


@pytest.fixture
def profiled_bundle(make_bundle, keys, resign) -> Path:
    bundle = make_bundle(1, name="tiny")
    (bundle / "drift_profile.json").write_text(json.dumps({"limit": 100.0}))
    resign(bundle, keys[0])  # listed and signed like every other file of the bundle
    return bundle


def test_live_traffic_feeds_the_monitor_and_the_route_reports_it(serve, keys, profiled_bundle, drift_module) -> None:
    running = serve(profiled_bundle, trusted_keys=[keys[1]])
    with httpx.Client(base_url=running.url, timeout=30) as client:
        for rows in ([[1, 2, 3, 4]], [[1, 1, 1, 1], [2, 2, 2, 2]], [[500, 0, 0, 0]]):
            assert client.post("/v2/models/tiny/infer", json=infer_body(rows)).status_code == 200
        (monitor,) = drift_module.instances
        assert monitor.profile == {"limit": 100.0}
        wait_for(lambda: monitor.rows == 4, what="observations")
        report = client.get("/v2/models/tiny/drift").json()
        text = client.get("/metrics").text
    assert report["enabled"] is True and report["model_version"] == "1"
    assert report["samples_seen"] == 4 and report["alarm"] is True
    assert 'compactai_drift_alarm{model="tiny",version="1"} 1.0' in text
    assert 'compactai_drift_score{model="tiny",test="first_value",version="1"} 1.0' in text
    assert 'compactai_drift_threshold{model="tiny",test="first_value",version="1"} 0.5' in text
    wait_for(lambda: bool(events(running, "drift_alarm")), what="the drift alarm log line")
    (alarm,) = events(running, "drift_alarm")
    assert alarm["alarm"] is True and alarm["version"] == "1" and alarm["scores"] == {"first_value": 1.0}


def test_without_a_profile_or_without_the_module_the_route_says_so(serve, keys, make_bundle, profiled_bundle,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    plain = serve(make_bundle(2, name="tiny"), trusted_keys=[keys[1]])
    monkeypatch.setitem(sys.modules, "compactai.runtime.drift", None)  # as if the module were not installed
    no_module = serve(profiled_bundle, trusted_keys=[keys[1]])
    for running in (plain, no_module):
        with httpx.Client(base_url=running.url, timeout=30) as client:
            assert client.post("/v2/models/tiny/infer", json=infer_body([[1, 2, 3, 4]])).status_code == 200
            report = client.get("/v2/models/tiny/drift").json()
            assert report["enabled"] is False and report["message"] == NO_PROFILE
            assert "compactai_drift_alarm{" not in client.get("/metrics").text
