"""The update agent stages only what a verified manifest lists (issue 13, items 3 and 5).

Before a byte of a local bundle is copied into the install directory, its manifest and signature
are read and verified; then only the listed files are copied or extracted, each bounded by its
signed size. An extra file (here a 10 GiB sparse one) is refused without being copied.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from compactai.bundle import MANIFEST_FILE, SIGNATURE_FILE, BundleRefused, VerifyPolicy, canonical_bytes
from compactai.bundle.signing import sign
from compactai.runtime.fetch import fetch
from tests.bundle.helpers import ZERO_CHUNK, disk_used, staged_files, write_tar_gz

SPARSE_BYTES = 10 * 1024**3  # 10 GiB of holes: nothing on disk unless someone copies it


def staged_refusal(source: Path, staging: Path, keys) -> str:
    staging.mkdir()
    with pytest.raises(BundleRefused) as refused:
        fetch(source, staging, VerifyPolicy([keys[1]]))
    return refused.value.reason


@pytest.mark.parametrize(("signed", "reason"), [(True, "extra-file"), (False, "missing-signature")])
def test_directory_with_a_huge_sparse_extra_file_is_not_copied(tmp_path, keys, make_bundle, signed, reason):
    bundle = make_bundle(2)
    if not signed:
        (bundle / SIGNATURE_FILE).unlink()
    (bundle / "huge.bin").touch()
    os.truncate(bundle / "huge.bin", SPARSE_BYTES)
    assert disk_used(bundle) < ZERO_CHUNK
    staging = tmp_path / "staging"
    assert staged_refusal(bundle, staging, keys) == reason
    assert disk_used(staging) < ZERO_CHUNK
    assert staged_files(staging) == ({MANIFEST_FILE, SIGNATURE_FILE} if signed else {MANIFEST_FILE})


def test_agent_refuses_the_sparse_extra_file_and_keeps_version_1(agent_v1, make_bundle):
    bundle = make_bundle(2)
    (bundle / "huge.bin").touch()
    os.truncate(bundle / "huge.bin", SPARSE_BYTES)
    result = agent_v1.update(bundle)
    assert (result.status, result.reason) == ("refused", "extra-file")
    assert agent_v1.state.active == 1 and list((agent_v1.install_dir / "staging").iterdir()) == []
    assert disk_used(agent_v1.install_dir) < 4 * ZERO_CHUNK


def test_gzip_bomb_is_refused_before_it_reaches_the_install_directory(tmp_path, keys, agent_v1):
    bomb = write_tar_gz(tmp_path / "bomb.tar.gz", [], zeros_member=("model.onnx", 1100 * ZERO_CHUNK))
    staging = tmp_path / "staging"
    assert staged_refusal(bomb, staging, keys) == "missing-manifest"
    assert disk_used(staging) < ZERO_CHUNK
    result = agent_v1.update(bomb)
    assert (result.status, result.reason) == ("refused", "missing-manifest")
    assert agent_v1.state.active == 1


def test_listed_file_larger_than_signed_is_not_copied_past_its_size(tmp_path, keys, make_bundle):
    bundle = make_bundle(2)
    signed_size = (bundle / "model.onnx").stat().st_size
    with (bundle / "model.onnx").open("ab") as grow:
        grow.truncate(SPARSE_BYTES)
    staging = tmp_path / "staging"
    assert staged_refusal(bundle, staging, keys) == "hash-mismatch"
    assert disk_used(staging) < ZERO_CHUNK + signed_size


def test_golden_path_outside_the_bundle_is_refused_by_the_agent(tmp_path, keys, agent_v1, make_bundle):
    bundle = make_bundle(2)
    outside = tmp_path / "golden_inputs.npz"
    shutil.copyfile(bundle / "golden_inputs.npz", outside)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["golden"]["inputs"] = str(outside)
    raw = canonical_bytes(manifest)
    (bundle / MANIFEST_FILE).write_bytes(raw)
    (bundle / SIGNATURE_FILE).write_bytes(sign(keys[0], raw))
    result = agent_v1.update(bundle)
    assert (result.status, result.reason) == ("refused", "unsafe-path"), result
    assert agent_v1.state.active == 1 and 2 not in agent_v1.state.blocked
