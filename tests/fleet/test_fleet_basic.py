"""Publishing to a fleet repository and updating a device from it over HTTP."""

from __future__ import annotations

from compactai.runtime import fleet_status


def test_device_installs_the_newest_bundle_then_reports_current(fleet):
    assert fleet.active() == 1
    fleet.publish(2)
    result = fleet.update()
    assert result.status == "committed", result
    assert result.steps[:2] == ["tuf-refresh", "tuf-download"]
    assert fleet.active() == 2
    again = fleet.update()
    assert again.status == "current" and again.version == 2
    staleness = fleet_status(fleet.agent())
    assert staleness["last_reason"] is None and staleness["expired"] is False
    assert staleness["timestamp_version"] == 3 and staleness["root_version"] == 1
