"""`compactai bundle` copies and signs only the model's own files (issue 13, item 2).

External data is resolved at bundle time: a symlinked data file or directory, or data outside the
model's directory, is refused (a signed bundle must not carry /etc/passwd), the ONNX checker runs on
the source before anything is copied, and data in a subdirectory keeps its relative path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from compactai.bundle import VerifyPolicy, build_bundle, verify_bundle
from compactai.errors import BadInputError, CorruptModelError
from tests.bundle.helpers import tiny_onnx


def test_symlinked_external_data_file_is_refused(tmp_path, signing_keys):
    model = tiny_onnx(tmp_path / "src", "model.onnx.data")
    secret = tmp_path / "secret.data"  # same bytes, so the model would even load and verify
    os.replace(model.parent / "model.onnx.data", secret)
    (model.parent / "model.onnx.data").symlink_to(secret)
    with pytest.raises(BadInputError, match="symlink"):
        build_bundle(model, tmp_path / "b", signing_keys[0], 1)
    assert not (tmp_path / "b").exists()
    assert not list(tmp_path.glob(".bundle-*"))


def test_external_data_under_a_symlinked_directory_is_refused(tmp_path, signing_keys):
    model = tiny_onnx(tmp_path / "src", "weights/w.data")
    os.replace(model.parent / "weights", tmp_path / "elsewhere")
    (model.parent / "weights").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BadInputError, match=r"symlink|outside"):
        build_bundle(model, tmp_path / "b", signing_keys[0], 1)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", ["golden_inputs.npz", "manifest.json", "manifest.json.sig"])
def test_external_data_named_like_a_bundle_file_is_refused(tmp_path, signing_keys, name):
    model = tiny_onnx(tmp_path / "src", name)  # would be overwritten by the bundle's own file
    with pytest.raises(BadInputError, match=name.replace(".", r"\.")):
        build_bundle(model, tmp_path / "b", signing_keys[0], 1)


@pytest.mark.parametrize("out", ["b", "b.tar.gz"])
def test_external_data_in_a_subdirectory_is_bundled_with_its_path(tmp_path, signing_keys, out):
    model = tiny_onnx(tmp_path / "src", "weights/w.data")
    manifest = build_bundle(model, tmp_path / out, signing_keys[0], 1)
    assert {f["path"] for f in manifest["files"]} == {"model.onnx", "weights/w.data", "golden_inputs.npz",
                                                      "golden_outputs.npz"}
    verified = verify_bundle(tmp_path / out, VerifyPolicy([signing_keys[1]]), workdir=tmp_path / "unpacked")
    assert verified.steps[-1] == "self-test"
    assert (verified.root / "weights" / "w.data").read_bytes() == (model.parent / "weights" / "w.data").read_bytes()


def test_model_failing_the_onnx_checker_is_refused_before_copying(tmp_path, signing_keys):
    model = tiny_onnx(tmp_path / "src", "model.onnx.data", op="NoSuchOp")
    with pytest.raises(CorruptModelError) as refused:
        build_bundle(model, tmp_path / "out" / "b", signing_keys[0], 1)
    assert str(model) in str(refused.value)  # the user's file, not a copy in a temporary directory
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_builder_writes_the_signed_metadata_first_in_archives(tmp_path, signing_keys):
    build_bundle(tiny_onnx(tmp_path / "src"), tmp_path / "b.tar", signing_keys[0], 1)
    with tarfile.open(tmp_path / "b.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["manifest.json", "manifest.json.sig"]  # a verifier reads them before anything else


def test_cli_bundle_with_symlinked_external_data_exits_2(tmp_path, signing_keys):
    model = tiny_onnx(tmp_path / "src", "model.onnx.data")
    (tmp_path / "passwd").write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 2)  # 64 bytes, like the weight
    (model.parent / "model.onnx.data").unlink()
    (model.parent / "model.onnx.data").symlink_to(tmp_path / "passwd")
    done = subprocess.run([sys.executable, "-m", "compactai.cli", "bundle", str(model), "-o", str(tmp_path / "b"),
                           "-k", str(signing_keys[2]), "-v", "1"], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert done.returncode == 2, done.stderr
    assert "symlink" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "b").exists()
