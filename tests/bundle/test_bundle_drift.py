"""The drift profile a bundle carries: computed by `compactai bundle --data`, signed like the model,
read back by the server's monitor; bundles without reference data serve without drift."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from compactai.bundle import (
    VerifyPolicy,
    build_bundle,
    load_private_key,
    load_public_key,
    verify_bundle,
)
from compactai.bundle.drift_profile import drift_profile_files
from compactai.errors import BadInputError, SecurityError, UnknownNameError
from compactai.examples import load_example
from compactai.measure.drift import PROFILE_FILE
from compactai.runtime.drift import NO_PROFILE, DriftMonitor
from tests.bundle.helpers import run_cli


@pytest.fixture
def task_data(tmp_path: Path) -> Path:
    """An .npz in the '<split>/<input>' format the commands take: 16x16 images with labels."""
    rng = np.random.default_rng(0)
    arrays = {f"{split}/image": rng.normal(0, 1, (n, 1, 16, 16)).astype(np.float32)
              for split, n in (("calibration", 80), ("validation", 60), ("test", 60))}
    arrays.update({f"{split}/labels": rng.integers(0, 10, 80 if split == "calibration" else 60)
                   for split in ("calibration", "validation", "test")})
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return path


def test_cli_bundle_with_data_carries_a_signed_profile_the_monitor_reads(keypair, small_onnx, task_data, tmp_path):
    private, public = keypair
    made = run_cli("bundle", str(small_onnx), "-o", str(tmp_path / "b"), "--key", str(private), "--version", "1",
                   "--data", str(task_data), "--drift-window", "50", "--json")
    assert made.returncode == 0, made.stderr
    result = json.loads(made.stdout)
    assert result["drift_profile"] == [PROFILE_FILE] and "data.npz" in result["drift"]
    assert PROFILE_FILE in {f["path"] for f in result["manifest"]["files"]}
    verified = verify_bundle(tmp_path / "b", VerifyPolicy([load_public_key(public)]))
    assert verified.steps[-1] == "self-test"

    profile = json.loads((verified.root / PROFILE_FILE).read_text())
    monitor = DriftMonitor.from_profile(profile)  # what the server does: json.loads, nothing else
    assert (profile["kind"], profile["window"], profile["calibration"]["reference_samples"]) == ("classifier", 50, 140)
    with np.load(task_data, allow_pickle=False) as data:
        live = data["test/image"][:50]
    session = ort.InferenceSession(str(verified.root / "model.onnx"), providers=["CPUExecutionProvider"])
    monitor.observe({"image": -3 * live}, session.run(None, {"image": -3 * live}))
    report = monitor.report()
    assert report["enabled"] and report["ready"] and report["alarm"]  # a scaled, inverted input drifts
    from_disk = DriftMonitor.from_bundle(verified.root)
    from_disk.observe({"image": -3 * live}, session.run(None, {"image": -3 * live}))
    assert from_disk.report()["scores"] == report["scores"]

    (verified.root / PROFILE_FILE).write_text(json.dumps({**profile, "alpha": 0.5}))  # tampered thresholds
    with pytest.raises(SecurityError) as refused:
        verify_bundle(tmp_path / "b", VerifyPolicy([load_public_key(public)]))
    assert refused.value.reason == "hash-mismatch"


def test_bundle_without_reference_data_serves_without_drift(keypair, small_onnx, tmp_path):
    made = run_cli("bundle", str(small_onnx), "-o", str(tmp_path / "b"), "--key", str(keypair[0]), "--version", "1",
                   "--json")
    assert made.returncode == 0, made.stderr
    result = json.loads(made.stdout)
    assert result["drift_profile"] is None and "--data" in result["drift"]
    assert DriftMonitor.from_bundle(tmp_path / "b").report() == {"enabled": False, "reason": NO_PROFILE}


def test_extra_files_cannot_replace_bundle_files_or_escape(keypair, small_onnx, tmp_path):
    key = load_private_key(keypair[0])
    extra = tmp_path / "extra.json"
    extra.write_text("{}")
    for name in ("model.onnx", "golden_inputs.npz", "manifest.json", "../escape.json", "/abs.json"):
        with pytest.raises(BadInputError, match="Cannot add extra file"):
            build_bundle(small_onnx, tmp_path / f"b{len(name)}", key, 1, extra_files={name: extra})
    manifest = build_bundle(small_onnx, tmp_path / "ok", key, 1, extra_files={"notes/extra.json": extra})
    assert "notes/extra.json" in {f["path"] for f in manifest["files"]}


def test_reference_comes_from_the_example_an_output_directory_was_made_from(small_onnx, tmp_path):
    """results.json -> source.example names the reference data (an unknown one fails by name, before any work)."""
    with pytest.raises(UnknownNameError, match="no-such-example"):
        drift_profile_files(small_onnx, {"source": {"example": "no-such-example"}}, tmp_path,
                            example_loader=load_example)
    files, why = drift_profile_files(small_onnx, {"source": {"path": "model.onnx"}}, tmp_path)
    assert files == {} and "--example" in why
    with pytest.raises(BadInputError, match="not both"):
        drift_profile_files(small_onnx, None, tmp_path, data="x.npz", example="digits")


@pytest.mark.slow
def test_profile_from_the_digits_example_of_an_output_directory(digits, tmp_path):
    """An output directory made with --example digits: the profile comes from the example's calibration +
    validation splits through the bundled model, and flags inverted digits."""
    model = digits.handle.to_onnx(tmp_path / "teacher.onnx").path
    files, origin = drift_profile_files(model, {"source": {"example": "digits"}}, tmp_path / "drift",
                                        example_loader=load_example)
    assert list(files) == [PROFILE_FILE] and "example digits" in origin
    monitor = DriftMonitor.from_bundle(tmp_path / "drift")
    report = monitor.report()
    assert report["kind"] == "classifier" and report["window"] == 200
    images = digits.task.splits["test"].inputs["image"][:200]
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    monitor.observe({"image": -images}, session.run(None, {"image": -images}))
    assert monitor.report()["alarm"]
