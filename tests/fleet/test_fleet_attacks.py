"""TUF's threat model, one attack per test, against a repository served on 127.0.0.1.

Each test starts from a device running version 1 (the ``fleet`` fixture) and checks that the
attack is refused with the expected reason and that the previously active version still serves.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from tuf.api.metadata import Metadata

from compactai.bundle.build import write_archive
from compactai.fleet import Repository, metadata_staleness
from compactai.runtime import UpdateLimits, fleet_status
from tests.fleet.conftest import MODEL, Fleet


def _refused(result, reason: str) -> None:
    assert result.status == "refused", result
    assert result.reason == reason, result


def test_arbitrary_installation_swapped_target_is_refused(fleet):
    """A mirror serves another bundle, validly signed with the publisher's bundle key (a leaked build),
    in place of the published target: TUF's signed length and hashes refuse it."""
    published = fleet.publish(2)
    leaked = fleet.tmp / "leaked.tar"
    write_archive(fleet.bundle(2), leaked)  # same model name and version, other weights
    fleet.server.overrides[f"/targets/{MODEL}/{published['sha256']}.stable.tar"] = leaked.read_bytes()
    _refused(fleet.update(), "tuf-hash-mismatch")
    assert fleet.active() == 1


@pytest.mark.parametrize("what", ["timestamp", "target"])
def test_endless_data_is_cut_at_the_signed_length(fleet, what):
    """A server streams data without end (no Content-Length) for timestamp.json (bounded by ngclient's
    maximum) or for the bundle (bounded by its signed length)."""
    published = fleet.publish(2)
    path = "/metadata/timestamp.json" if what == "timestamp" else \
        f"/targets/{MODEL}/{published['sha256']}.stable.tar"
    fleet.server.endless.add(path)
    _refused(fleet.update(), "oversize")
    assert fleet.active() == 1


def test_extraneous_dependencies_need_the_targets_key(fleet):
    """An attacker who holds the online keys (snapshot, timestamp) adds a 'dependency' target and makes
    the model's target require it: without the targets key, targets.json is refused and no file of
    the attacker is ever fetched."""
    dependency = fleet.tmp / "dependency.tar"
    write_archive(fleet.bundle(7, name="helper"), dependency)
    mirror = fleet.snapshot_dir("mirror")
    attacker = fleet.key("attacker-targets")
    fleet.forge_release(mirror, 2, targets=[attacker], snapshot=[fleet.snapshot_key], timestamp=[fleet.timestamp_key],
                        extra_targets={"helper/stable.tar": dependency}, requires=["helper/stable.tar"])
    fleet.server.root = mirror
    fleet.server.requests.clear()
    _refused(fleet.update(), "tuf-signature")
    assert fleet.active() == 1
    assert "/metadata/3.targets.json" in fleet.server.requests  # it was offered, and refused
    assert not [path for path in fleet.server.requests if path.startswith("/targets/")]


def test_fast_forward_unsigned_version_jump_is_refused(fleet):
    """A timestamp claiming version 10^9 without a valid signature cannot push the device's version floor:
    it is refused, and the publisher's next real version still installs."""
    forged = Metadata.from_file(str(fleet.repo_dir / "metadata" / "timestamp.json"))
    forged.signed.version = 10**9
    forged.signed.expires = datetime.now(timezone.utc) + timedelta(days=1)  # keeps the old (now invalid) signature
    fleet.server.overrides["/metadata/timestamp.json"] = forged.to_bytes()
    _refused(fleet.update(), "tuf-signature")
    assert fleet.active() == 1
    fleet.server.overrides.clear()
    fleet.publish(2)
    assert fleet.update().status == "committed"
    assert fleet.active() == 2


def test_fast_forward_with_a_stolen_timestamp_key_is_undone_by_rotating_it(fleet):
    """With the online timestamp key, an attacker signs timestamp version 10^6: the device refuses the
    update it points to, but now trusts that version and refuses the publisher's real ones (the
    fast-forward attack). Rotating the timestamp key (a new root) lets the device recover."""
    mirror = fleet.snapshot_dir("mirror")
    forged = Metadata.from_file(str(mirror / "metadata" / "timestamp.json"))
    forged.signed.version = 10**6
    forged.signed.snapshot_meta.version = 10**6
    forged.sign(fleet.timestamp_key.signer)
    (mirror / "metadata" / "timestamp.json").write_bytes(forged.to_bytes())
    fleet.server.root = mirror
    _refused(fleet.update(), "download-failed")  # snapshot v10^6 does not exist
    assert fleet.active() == 1
    fleet.server.root = fleet.repo_dir
    fleet.publish(2)
    _refused(fleet.update(), "tuf-rollback")  # fast-forwarded: the real timestamp looks old
    assert fleet.active() == 1
    new_timestamp_key = fleet.key("timestamp2")
    fleet.repo([*fleet.root_keys, new_timestamp_key]).rotate(
        "timestamp", add=[new_timestamp_key], remove=[fleet.timestamp_key.keyid])
    assert fleet.update().status == "committed"
    assert fleet.active() == 2
    Repository(fleet.repo_dir).refresh_timestamp()  # cron signs with the new key: its path was recorded
    assert fleet.update().status == "current"


def test_indefinite_freeze_expired_timestamp_is_refused_and_staleness_reported(fleet):
    """A mirror keeps serving a timestamp that has expired (the newest it let through): refused, and the
    device reports when it last refreshed and that its own metadata expires."""
    before = fleet_status(fleet.agent())
    signed_two_days_ago = Repository(fleet.repo_dir, now=datetime.now(timezone.utc) - timedelta(days=2))
    frozen = signed_two_days_ago.refresh_timestamp().to_bytes()  # expired one day ago
    fleet.publish(2)
    fleet.server.overrides["/metadata/timestamp.json"] = frozen
    _refused(fleet.update(), "tuf-expired")
    assert fleet.active() == 1
    report = fleet_status(fleet.agent())
    assert report["last_reason"] == "tuf-expired"
    assert report["last_refresh"] == before["last_refresh"]  # the last success, not the refused attempt
    assert report["timestamp_version"] == before["timestamp_version"]  # the frozen one was not trusted
    later = metadata_staleness(fleet.install / "fleet", now=datetime.now(timezone.utc).timestamp() + 2 * 86400)
    assert later["expired"] is True and later["seconds_to_expiry"] < 0
    assert later["seconds_since_refresh"] >= 2 * 86400


def test_malicious_mirror_with_its_own_keys_is_refused(fleet, tmp_path):
    """A mirror serves a complete, consistent repository of its own (its own keys, a newer root, an
    evil bundle): nothing chains to the device's trusted root."""
    attacker = Fleet(tmp_path / "attacker", fleet.server, repo_dir=tmp_path / "attacker" / "repo")
    attacker.repo().rotate("root", threshold=1)  # a root v2 that claims to follow the device's v1
    attacker.publish(9)
    fleet.server.root = attacker.repo_dir
    _refused(fleet.update(), "tuf-signature")
    assert fleet.active() == 1
    assert "/metadata/2.root.json" in fleet.server.requests


def test_mix_and_match_old_targets_with_new_snapshot_is_refused(fleet):
    """A mirror serves the new timestamp and snapshot but the targets metadata of an older release."""
    old_targets = (fleet.repo_dir / "metadata" / "targets.json").read_bytes()
    fleet.publish(2)
    version = Metadata.from_file(str(fleet.repo_dir / "metadata" / "targets.json")).signed.version
    fleet.server.overrides[f"/metadata/{version}.targets.json"] = old_targets
    _refused(fleet.update(), "tuf-hash-mismatch")
    assert fleet.active() == 1


def test_rollback_to_an_older_repository_is_refused(fleet):
    """After the device installed version 2, a mirror serves the repository as it was at version 1
    (valid, unexpired, correctly signed metadata): older than what the device trusts."""
    old = fleet.snapshot_dir("old-repo")
    fleet.publish(2)
    assert fleet.update().status == "committed"
    fleet.server.root = old
    _refused(fleet.update(), "tuf-rollback")
    assert fleet.active() == 2


def test_slow_retrieval_hits_the_overall_deadline(fleet):
    """The bundle trickles one byte every 0.1 s: every read is quick, so only the overall deadline of all
    TUF downloads (UpdateLimits.download_deadline_s) stops it."""
    published = fleet.publish(2)
    fleet.server.trickle[f"/targets/{MODEL}/{published['sha256']}.stable.tar"] = 0.1
    agent = fleet.agent()
    agent.limits = UpdateLimits(download_deadline_s=3.0, min_download_rate=0.0, rate_window_s=2.0).check()
    result = fleet.update(agent)
    _refused(result, "slow-retrieval")
    assert "deadline" in result.message
    assert fleet.active() == 1


def test_key_compromise_below_threshold_is_refused(tmp_path, server):
    """Targets needs 2 of 2 keys; the attacker stole one targets key and the online keys (the server):
    the target they sign with one key is refused."""
    fleet = Fleet(tmp_path, server, targets_keys=2, targets_threshold=2)
    fleet.publish(1)
    assert fleet.update().status == "committed"
    mirror = fleet.snapshot_dir("mirror")
    fleet.forge_release(mirror, 2, targets=[fleet.targets_keys[0]], snapshot=[fleet.snapshot_key],
                        timestamp=[fleet.timestamp_key])
    server.root = mirror
    server.requests.clear()
    _refused(fleet.update(), "tuf-signature")
    assert fleet.active() == 1
    assert "/metadata/3.targets.json" in server.requests  # it was offered, and refused
    assert not [path for path in server.requests if path.startswith("/targets/")]


def test_publisher_refuses_to_sign_below_threshold(tmp_path, server):
    """The publisher's side enforces the same threshold: with one of two targets keys, add fails."""
    fleet = Fleet(tmp_path, server, targets_keys=2, targets_threshold=2)
    with pytest.raises(ValueError, match="needs 2 signature"):
        fleet.publish(1, signers=[*fleet.root_keys, fleet.targets_keys[0]])
    assert Repository(fleet.repo_dir).targets.signed.targets == {}
    assert not list((fleet.repo_dir / "targets").rglob("*.tar"))  # no orphan file left behind
