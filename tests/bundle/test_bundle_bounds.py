"""No unbounded work before a bundle is authenticated (issue 13, item 5).

The signed metadata is read first (bounded), verified, and only then are the listed files
extracted, each no larger than its signed size. Archives here are small real files: a 1 MB
.tar.gz that expands to 1.1 GiB, and 50,000 empty members.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from compactai.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleRefused,
    VerifyPolicy,
    build_bundle,
    verify_bundle,
)
from tests.bundle.helpers import (
    ZERO_CHUNK,
    bundle_members,
    disk_used,
    empty_members,
    staged_files,
    tiny_onnx,
    write_tar_gz,
)

BOMB_BYTES = 1100 * ZERO_CHUNK  # 1.1 GiB expanded, about 1.1 MB compressed
METADATA = [MANIFEST_FILE, SIGNATURE_FILE]


@pytest.fixture
def signed(tmp_path: Path, signing_keys) -> Path:
    build_bundle(tiny_onnx(tmp_path / "src"), tmp_path / "signed", signing_keys[0], 2)
    return tmp_path / "signed"


def refused_reason(archive: Path, signing_keys, unpacked: Path) -> str:
    with pytest.raises(BundleRefused) as refused:
        verify_bundle(archive, VerifyPolicy([signing_keys[1]]), workdir=unpacked)
    assert "\n" not in str(refused.value)
    return refused.value.reason


def test_unsigned_gzip_bomb_is_refused_before_it_expands(tmp_path, signing_keys):
    bomb = write_tar_gz(tmp_path / "bomb.tar.gz", [], zeros_member=("model.onnx", BOMB_BYTES))
    assert bomb.stat().st_size < 2 * 1024**2
    unpacked = tmp_path / "unpacked"
    assert refused_reason(bomb, signing_keys, unpacked) == "missing-manifest"
    assert disk_used(unpacked) < ZERO_CHUNK  # not a byte of the 1.1 GiB reached the disk


@pytest.mark.parametrize(("name", "reason"), [("model.onnx", "oversize"), ("notes.bin", "extra-file")])
def test_signed_metadata_then_a_huge_member(tmp_path, signing_keys, signed, name, reason):
    # authentic metadata, then a member bigger than signed (or not listed at all): refused from its header
    bomb = write_tar_gz(tmp_path / "b.tar.gz", bundle_members(signed, METADATA), zeros_member=(name, BOMB_BYTES))
    unpacked = tmp_path / "unpacked"
    assert refused_reason(bomb, signing_keys, unpacked) == reason
    assert disk_used(unpacked) < ZERO_CHUNK


@pytest.mark.parametrize(("with_metadata", "reason"), [(False, "missing-manifest"), (True, "oversize")])
def test_huge_long_name_record_is_cut_off_at_the_byte_cap(tmp_path, signing_keys, signed, with_metadata, reason):
    # tarfile reads a GNU long-name record whole while parsing headers: the cap under decompression stops it
    head = bundle_members(signed, METADATA) if with_metadata else []
    bomb = write_tar_gz(tmp_path / "longname.tar.gz", head, zeros_member=("././@LongLink", BOMB_BYTES),
                        zeros_kind=tarfile.GNUTYPE_LONGNAME)
    unpacked = tmp_path / "unpacked"
    assert refused_reason(bomb, signing_keys, unpacked) == reason
    assert staged_files(unpacked) == (set(METADATA) if with_metadata else set())


@pytest.mark.parametrize(("with_metadata", "reason"), [(False, "missing-manifest"), (True, "extra-file")])
def test_50000_empty_members_are_refused_having_extracted_nothing(tmp_path, signing_keys, signed, with_metadata,
                                                                  reason):
    head = bundle_members(signed, METADATA) if with_metadata else []
    archive = write_tar_gz(tmp_path / "many.tar.gz", head + empty_members(50_000))
    unpacked = tmp_path / "unpacked"
    assert refused_reason(archive, signing_keys, unpacked) == reason
    # only the (bounded) metadata is staged, so that a refusal can log the version it claimed
    assert staged_files(unpacked) == (set(METADATA) if with_metadata else set())


def test_unsigned_archive_with_a_valid_layout_is_refused_unextracted(tmp_path, signing_keys, signed):
    names = ["golden_inputs.npz", "golden_outputs.npz", MANIFEST_FILE, "model.onnx"]
    archive = write_tar_gz(tmp_path / "unsigned.tar.gz", bundle_members(signed, names))
    unpacked = tmp_path / "unpacked"
    assert refused_reason(archive, signing_keys, unpacked) == "missing-signature"
    assert staged_files(unpacked) == {MANIFEST_FILE}


def test_archive_with_metadata_after_the_files_still_verifies(tmp_path, signing_keys, signed):
    # the order older builders wrote (sorted names): the metadata is found within the scan bound
    names = ["golden_inputs.npz", "golden_outputs.npz", MANIFEST_FILE, SIGNATURE_FILE, "model.onnx"]
    archive = tmp_path / "sorted.tar"
    with tarfile.open(archive, "w") as tar:
        for name in names:
            tar.add(signed / name, arcname=name)
    verified = verify_bundle(archive, VerifyPolicy([signing_keys[1]]), workdir=tmp_path / "unpacked")
    assert verified.steps[-1] == "self-test"


def test_listed_member_appearing_twice_is_refused(tmp_path, signing_keys, signed):
    names = [*METADATA, "golden_inputs.npz", "golden_outputs.npz", "model.onnx", "model.onnx"]
    archive = write_tar_gz(tmp_path / "twice.tar.gz", bundle_members(signed, names))
    assert refused_reason(archive, signing_keys, tmp_path / "unpacked") == "bad-archive"
