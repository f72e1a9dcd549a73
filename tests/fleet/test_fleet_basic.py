"""Publishing to a fleet repository and updating a device from it over HTTP."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest

from compactai.errors import BadInputError
from compactai.fleet import Repository
from compactai.runtime import fleet_status, update_from_repository
from tests.fleet.conftest import MODEL


def test_device_installs_the_newest_bundle_then_reports_current(fleet):
    assert fleet.active() == 1
    fleet.publish(2)
    result = fleet.update()
    assert result.status == "committed", result
    assert result.steps[:2] == ["tuf-refresh", "tuf-download"]
    assert fleet.active() == 2
    again = fleet.update()
    assert again.status == "current" and again.version == 2 and again.ok
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


def test_concurrent_publishers_never_sign_the_same_version(fleet):
    """A cron refresh-timestamp and other publisher commands take turns (the publisher's lock): no
    version is signed twice and none is lost."""
    start = Repository(fleet.repo_dir).timestamp.signed.version
    errors: list[BaseException] = []

    def refresh_five_times() -> None:
        try:
            for _ in range(5):
                fleet.repo().refresh_timestamp()
        except BaseException as exc:  # noqa: BLE001 (reported by the assert below)
            errors.append(exc)

    threads = [threading.Thread(target=refresh_five_times) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert Repository(fleet.repo_dir).timestamp.signed.version == start + 15
    assert fleet.update().status == "current"


def test_unreachable_repository_is_bad_input_not_a_refusal(fleet):
    """Connection refused is a network problem (exit 2 in the CLI), recorded for the staleness report."""
    with pytest.raises(BadInputError, match="Cannot download from the repository"):
        update_from_repository(fleet.agent(), "http://127.0.0.1:1/", fleet.trusted_root, model=MODEL)
    assert fleet.active() == 1
    report = fleet_status(fleet.agent())
    assert report["last_reason"] == "DownloadError" and report["expired"] is False
