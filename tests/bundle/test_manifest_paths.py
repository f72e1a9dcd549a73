"""Every path a signed manifest names is one of its listed, hash-checked files (issue 13, item 3).

A publisher's key signing ``"golden": {"inputs": "/etc/..."}`` or ``"../../x.npz"`` must not make a
verifier open that file: the name is refused before any file is read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from compactai.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleRefused,
    VerifyPolicy,
    build_bundle,
    canonical_bytes,
    verify_bundle,
    write_signed_manifest,
)
from compactai.bundle.signing import sign
from tests.bundle.helpers import tiny_onnx


@pytest.fixture
def bundle(tmp_path: Path, signing_keys) -> Path:
    build_bundle(tiny_onnx(tmp_path / "src"), tmp_path / "b", signing_keys[0], 2)
    return tmp_path / "b"


def resign(bundle: Path, private_key, mutate) -> None:
    """Change the manifest and sign it again, as a compromised or careless publisher would."""
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    mutate(manifest)
    raw = canonical_bytes(manifest)
    (bundle / MANIFEST_FILE).write_bytes(raw)
    (bundle / SIGNATURE_FILE).write_bytes(sign(private_key, raw))


def refusal(bundle: Path, signing_keys) -> BundleRefused:
    with pytest.raises(BundleRefused) as refused:
        verify_bundle(bundle, VerifyPolicy([signing_keys[1]]))
    return refused.value


@pytest.mark.parametrize("role", ["inputs", "outputs"])
@pytest.mark.parametrize("style", ["absolute", "dotdot"])
def test_golden_file_outside_the_bundle_is_refused(tmp_path, bundle, signing_keys, role, style):
    # a valid copy of the golden file outside the bundle: if the verifier read it, the bundle would pass
    outside = tmp_path / "elsewhere" / f"golden_{role}.npz"
    outside.parent.mkdir()
    shutil.copyfile(bundle / f"golden_{role}.npz", outside)
    named = str(outside) if style == "absolute" else os.path.relpath(outside, bundle)
    resign(bundle, signing_keys[0], lambda m: m["golden"].__setitem__(role, named))
    refused = refusal(bundle, signing_keys)
    assert refused.reason == "unsafe-path", refused
    assert named in str(refused) and "\n" not in str(refused)


def test_golden_file_not_among_the_listed_files_is_refused(bundle, signing_keys):
    resign(bundle, signing_keys[0], lambda m: m["golden"].__setitem__("inputs", "spare.npz"))
    refused = refusal(bundle, signing_keys)
    assert refused.reason == "unsafe-path" and "spare.npz" in str(refused)


def test_model_path_outside_the_bundle_is_refused(tmp_path, bundle, signing_keys):
    resign(bundle, signing_keys[0], lambda m: m.__setitem__("model", str(tmp_path / "src" / "model.onnx")))
    assert refusal(bundle, signing_keys).reason == "unsafe-path"


@pytest.mark.parametrize("golden", [["golden_inputs.npz"], {"inputs": 3, "outputs": "golden_outputs.npz"}])
def test_malformed_golden_section_is_a_bad_manifest(bundle, signing_keys, golden):
    resign(bundle, signing_keys[0], lambda m: m.__setitem__("golden", golden))
    assert refusal(bundle, signing_keys).reason == "bad-manifest"


def test_model_not_named_onnx_is_still_checked_for_external_data(tmp_path, signing_keys):
    # the model is listed as weights.bin: its external data must still stay among the signed files
    model = tiny_onnx(tmp_path / "src", "model.onnx.data")
    build_bundle(model, tmp_path / "b", signing_keys[0], 2)
    bundle = tmp_path / "b"
    import onnx

    proto = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.data"
    onnx.save(proto, str(bundle / "weights.bin"))
    (bundle / "model.onnx").unlink()
    shutil.copyfile(bundle / "model.onnx.data", tmp_path / "secret.data")
    manifest = json.loads((bundle / MANIFEST_FILE).read_text())
    manifest["model"] = "weights.bin"
    write_signed_manifest(bundle, manifest, signing_keys[0])
    assert refusal(bundle, signing_keys).reason == "external-data"
