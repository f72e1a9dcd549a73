"""Publishing to a fleet repository and updating a device from it over HTTP."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from compactai.fleet import Repository
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


def test_refresh_timestamp_renews_the_snapshot_once_half_its_period_passed(fleet):
    """The cron job keeps both online roles fresh: a snapshot signed 5 of its 7 days ago is re-signed."""
    repo = fleet.repo()
    snapshot = repo.snapshot.signed.version
    repo.refresh_timestamp()
    assert Repository(fleet.repo_dir).snapshot.signed.version == snapshot  # still fresh: timestamp only
    Repository(fleet.repo_dir, now=datetime.now(timezone.utc) - timedelta(days=5)).resign("snapshot")
    renewed = Repository(fleet.repo_dir)
    renewed.refresh_timestamp()
    assert renewed.snapshot.signed.version == snapshot + 2
    assert renewed.status()["roles"]["snapshot"]["expires_in_days"] > 6
    assert fleet.update().status == "current"


def test_resign_targets_keeps_the_device_current(fleet):
    status = fleet.repo().resign("targets")
    assert status["roles"]["targets"]["version"] == 3
    assert fleet.update().status == "current"
