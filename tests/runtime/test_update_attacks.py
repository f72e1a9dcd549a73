"""Each attack of the TUF threat model is refused with a clear reason, and version 1 stays active."""

from __future__ import annotations

import json
import os
import pickle
import tarfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compactai.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    canonical_bytes,
    generate_keypair,
    load_private_key,
)
from compactai.runtime import UpdateAgent


def check_refused(agent: UpdateAgent, source: Path | str, reason: str) -> None:
    """The update is refused for ``reason``, logged and counted, and version 1 still runs intact."""
    before = agent.counters()["refusals"].get(reason, 0)
    result = agent.update(source)
    assert result.status == "refused", result
    assert result.reason == reason, result
    assert result.message and "\n" not in result.message
    state = agent.state
    assert state.active == 1 and not state.trial
    assert sorted(p.name for p in (agent.install_dir / "versions").iterdir()) == ["1"]
    assert agent._installed_ok(1)
    assert list((agent.install_dir / "staging").iterdir()) == []
    assert agent.counters()["refusals"][reason] == before + 1
    last = agent.events.read()[-1]
    assert last["event"] == "refused" and last["reason"] == reason and last["message"] == result.message


def test_flipped_byte_in_model(agent_v1, make_bundle):
    bundle = make_bundle(2)
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[-5] ^= 0x01
    (bundle / "model.onnx").write_bytes(bytes(data))
    check_refused(agent_v1, bundle, "hash-mismatch")


def test_missing_signature(agent_v1, make_bundle):
    bundle = make_bundle(2)
    (bundle / SIGNATURE_FILE).unlink()
    check_refused(agent_v1, bundle, "missing-signature")


def test_bad_signature_after_manifest_edit(agent_v1, make_bundle):
    bundle = make_bundle(2)
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["expires"] = "2099-01-01T00:00:00Z"  # extend the validity without the key
    (bundle / MANIFEST_FILE).write_bytes(canonical_bytes(manifest))
    check_refused(agent_v1, bundle, "bad-signature")


def test_garbage_signature(agent_v1, make_bundle):
    bundle = make_bundle(2)
    (bundle / SIGNATURE_FILE).write_text("not a signature")
    check_refused(agent_v1, bundle, "bad-signature")


def test_unknown_key(agent_v1, make_bundle, tmp_path):
    other, _ = generate_keypair(tmp_path / "attacker")
    check_refused(agent_v1, make_bundle(2, key=load_private_key(other)), "unknown-key")


def test_older_version_refused_also_after_restart(agent_v1, make_bundle, keys):
    assert agent_v1.update(make_bundle(3)).status == "committed"
    older = make_bundle(2)  # validly signed, but older than the highest version trusted
    result = agent_v1.update(older)
    assert (result.status, result.reason, agent_v1.state.active) == ("refused", "rollback", 3)
    restarted = UpdateAgent(agent_v1.install_dir, [keys[1]])
    for source in (older, make_bundle(3, scale=5.0), make_bundle(1)):
        result = restarted.update(source)
        assert (result.status, result.reason) == ("refused", "rollback")
    assert restarted.state.active == 3 and restarted.state.highest_trusted == 3
    assert restarted.counters()["refusals"]["rollback"] == 3


def test_expired_manifest(agent_v1, make_bundle):
    ten_days_ago = time.time() - 10 * 86400
    check_refused(agent_v1, make_bundle(2, now=ten_days_ago, expires_days=1), "expired")


def test_extra_file(agent_v1, make_bundle):
    bundle = make_bundle(2)
    (bundle / "notes.txt").write_text("not in the manifest")
    check_refused(agent_v1, bundle, "extra-file")


def test_missing_file(agent_v1, make_bundle):
    bundle = make_bundle(2)
    (bundle / "golden_outputs.npz").unlink()
    check_refused(agent_v1, bundle, "missing-file")


def test_mix_and_match_files_of_two_versions(agent_v1, make_bundle):
    bundle, other = make_bundle(2, scale=3.0), make_bundle(3, scale=4.0)
    (bundle / "model.onnx").write_bytes((other / "model.onnx").read_bytes())
    check_refused(agent_v1, bundle, "hash-mismatch")


def test_dotdot_path_in_signed_manifest(agent_v1, make_bundle, keys, tmp_path, resign):
    bundle = make_bundle(2)
    (tmp_path / "outside.bin").write_bytes(b"x")
    resign(bundle, keys[0], lambda m: m["files"].append(
        {"path": "../outside.bin", "size": 1, "sha256": "0" * 64}))
    check_refused(agent_v1, bundle, "unsafe-path")


def test_absolute_path_in_signed_manifest(agent_v1, make_bundle, keys, resign):
    bundle = make_bundle(2)
    resign(bundle, keys[0], lambda m: m["files"].append({"path": "/etc/hostname", "size": 1, "sha256": "0" * 64}))
    check_refused(agent_v1, bundle, "unsafe-path")


def test_dotdot_entry_in_archive(agent_v1, make_bundle, tmp_path):
    bundle = make_bundle(2)
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(bundle.iterdir()):
            tar.add(path, arcname=path.name)
        tar.add(bundle / "model.onnx", arcname="../escaped.onnx")
    check_refused(agent_v1, archive, "unsafe-path")
    assert not (agent_v1.install_dir / "escaped.onnx").exists()


def test_symlink_in_bundle_even_with_matching_hash(agent_v1, make_bundle, tmp_path):
    bundle = make_bundle(2)
    outside = tmp_path / "outside.npz"
    os.replace(bundle / "golden_inputs.npz", outside)  # same bytes, so the hash would match
    (bundle / "golden_inputs.npz").symlink_to(outside)
    check_refused(agent_v1, bundle, "symlink")


def test_symlink_in_archive(agent_v1, make_bundle, tmp_path):
    bundle = make_bundle(2)
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(bundle.iterdir()):
            tar.add(path, arcname=path.name)
        link = tarfile.TarInfo("passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    check_refused(agent_v1, archive, "symlink")


class _Payload:
    """Unpickling this creates the marker file: proof that pickle would have run code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["weights.pkl", "extra_weights.bin"])
def test_pickle_file_never_unpickled(agent_v1, make_bundle, keys, tmp_path, name, resign):
    marker = tmp_path / "PWNED"
    bundle = make_bundle(2)
    (bundle / name).write_bytes(pickle.dumps(_Payload(marker)))
    resign(bundle, keys[0])  # even a correctly signed pickle is refused
    check_refused(agent_v1, bundle, "pickle")
    assert not marker.exists()


def _external_data_bundle(tmp_path: Path, private_key, location: str, resign) -> Path:
    """A signed bundle whose model keeps its weight in external data at ``location``."""
    from compactai.bundle import build_bundle

    source = tmp_path / "ext-src"
    source.mkdir()
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "ext", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(source / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=0)
    bundle = tmp_path / "bundle-ext"
    build_bundle(source / "model.onnx", bundle, private_key, 2)
    if location != "model.onnx.data":
        proto = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
        for entry in proto.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        onnx.save(proto, str(bundle / "model.onnx"))
        (tmp_path / "secret.data").write_bytes((bundle / "model.onnx.data").read_bytes())
        resign(bundle, private_key)
    return bundle


def test_external_data_inside_bundle_is_accepted(agent_v1, keys, tmp_path, resign):
    bundle = _external_data_bundle(tmp_path, keys[0], "model.onnx.data", resign)
    assert (bundle / "model.onnx.data").exists()
    assert agent_v1.update(bundle).status == "committed"


def test_external_data_pointing_outside_the_bundle(agent_v1, keys, tmp_path, resign):
    bundle = _external_data_bundle(tmp_path, keys[0], "../secret.data", resign)
    check_refused(agent_v1, bundle, "external-data")
