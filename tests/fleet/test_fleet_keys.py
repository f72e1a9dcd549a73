"""Root rotation (1-of-1 to 2-of-3) and revocation of a compromised targets key: a device that trusted
the old root follows the new one and refuses what the revoked key signs."""

from __future__ import annotations

import copy

import pytest
from tuf.api.metadata import Metadata, Root

from compactai.fleet import load_key
from compactai.runtime import fleet_status
from tests.fleet.conftest import Fleet


def _device_root(fleet: Fleet) -> Root:
    return Metadata[Root].from_file(str(fleet.install / "fleet" / "metadata" / "root.json")).signed


def test_root_rotation_from_1_of_1_to_2_of_3_is_followed_by_the_device(fleet):
    old_root = fleet.root_keys[0]
    second = fleet.key("root2")
    third_pair = fleet.key("root3")
    third_public = load_key(third_pair.path.with_suffix(".pub"))  # only its public half is at hand
    assert third_public.signer is None
    fleet.repo([old_root]).rotate("root", add=[second, third_public], threshold=2)
    # the new root is signed by the old threshold (root1) and the new one (root1 + root2)
    new_root = Metadata[Root].from_file(str(fleet.repo_dir / "metadata" / "2.root.json"))
    assert set(new_root.signatures) == {old_root.keyid, second.keyid}
    fleet.publish(2)
    result = fleet.update()
    assert result.status == "committed", result
    assert fleet.active() == 2
    trusted = _device_root(fleet)
    assert trusted.version == 2 and trusted.roles["root"].threshold == 2
    assert len(trusted.roles["root"].keyids) == 3
    assert fleet_status(fleet.agent())["root_version"] == 2

    # a root v3 signed by one of the three keys only (one stolen key): below the new threshold
    forged = copy.deepcopy(new_root)
    forged.signed.version = 3
    attacker = fleet.key("attacker")
    forged.signed.add_key(attacker.key, "targets")
    forged.sign(second.signer)
    fleet.server.overrides["/metadata/3.root.json"] = forged.to_bytes()
    result = fleet.update()
    assert result.status == "refused" and result.reason == "tuf-signature", result
    assert _device_root(fleet).version == 2
    assert fleet.active() == 2


def test_publisher_needs_the_old_and_the_new_root_threshold(fleet):
    """Without the old root key, a new root cannot be made (the device could not follow it)."""
    second, third = fleet.key("root2"), fleet.key("root3")
    with pytest.raises(ValueError, match="needs 1 signature"):
        fleet.repo([]).rotate("root", add=[second, third], remove=[fleet.root_keys[0].keyid], threshold=2)


def test_revoked_targets_key_is_refused_by_a_device_that_trusted_the_old_root(tmp_path, server):
    """Targets is 1 of 2 keys; targets1 is stolen together with the online keys. After `revoke`, the
    device follows root v2 and refuses a release signed with targets1, which root v1 accepted."""
    fleet = Fleet(tmp_path, server, targets_keys=2, targets_threshold=1)
    fleet.publish(1)
    assert fleet.update().status == "committed"
    stolen, kept = fleet.targets_keys
    root_v1 = Metadata[Root].from_file(str(fleet.repo_dir / "metadata" / "1.root.json")).signed

    status = fleet.repo([*fleet.root_keys, kept]).revoke(stolen.keyid)
    assert status["revoked_from"] == ["targets"]
    assert status["roles"]["root"]["version"] == 2
    assert status["roles"]["targets"]["keys"] == [kept.keyid]
    fleet.publish(2, signers=[*fleet.root_keys, kept])
    assert fleet.update().status == "committed"
    assert _device_root(fleet).version == 2
    assert stolen.keyid not in _device_root(fleet).roles["targets"].keyids

    mirror = fleet.snapshot_dir("mirror")
    fleet.forge_release(mirror, 3, targets=[stolen], snapshot=[fleet.snapshot_key], timestamp=[fleet.timestamp_key])
    forged_targets = Metadata.from_file(str(mirror / "metadata" / "targets.json"))
    root_v1.verify_delegate("targets", forged_targets.signed_bytes, forged_targets.signatures)  # v1 would accept
    server.root = mirror
    result = fleet.update()
    assert result.status == "refused" and result.reason == "tuf-signature", result
    assert fleet.active() == 2


def test_revoking_below_the_threshold_is_refused(fleet):
    """Revoking the only targets key would leave the role unusable: the publisher says to rotate instead."""
    with pytest.raises(ValueError, match="rotate"):
        fleet.repo().revoke(fleet.targets_keys[0].keyid)
