"""Bundles carrying a device model (.tflite for LiteRT, .pte for ExecuTorch): built from the output
directory of an export, verified with the self-test run in that runtime (through its venv's worker),
refused when the model file changes, and refused by `compactai serve`, which serves ONNX and
OpenVINO models, with a message that says what to do. The conversions run when the runtime's venv
exists and skip with the install line otherwise; the refusals that need no device runtime run
everywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compactai.bundle import BundleRefused, VerifyPolicy, build_bundle, verify_bundle
from compactai.errors import BadInputError, UnsupportedFormatError
from compactai.measure import make_runner, runtime_plugin
from compactai.measure.devices import load_device_model
from compactai.results import write_results
from compactai.runtime.server.models import LoadedVersion


def needs(runtime: str) -> pytest.MarkDecorator:
    plugin = runtime_plugin(runtime)
    return pytest.mark.skipif(not plugin.available(), reason=f"no {runtime} venv: {plugin.install_line()}")


def export_dir(handle, runtime: str, out: Path) -> tuple[Path, object]:
    """What `compactai export --format tflite|pte -o OUT` leaves: the converted file and results.json."""
    converted = runtime_plugin(runtime).convert(handle, out)
    write_results(out, "export", converted, runtime=runtime, conversion=converted.metadata[runtime])
    return out, converted


@pytest.mark.parametrize("runtime", [pytest.param("litert", marks=needs("litert")),
                                     pytest.param("executorch", marks=needs("executorch"))])
def test_a_device_model_bundles_and_verifies_in_its_own_runtime(small_handle, signing_keys, tmp_path, runtime):
    private, public, _ = signing_keys
    source, converted = export_dir(small_handle, runtime, tmp_path / "export")
    suffix = converted.path.suffix
    manifest = build_bundle(source, tmp_path / "bundle", private, 1, name="cnn")
    assert manifest["runtime"] == runtime and manifest["model"] == f"model{suffix}"
    assert manifest["conversion"]["input_shapes"] == {small_handle.input_names[0]: [1, 16, 16]}
    assert {entry["path"] for entry in manifest["files"]} >= {f"model{suffix}", "golden_inputs.npz"}

    verified = verify_bundle(tmp_path / "bundle", VerifyPolicy([public]))
    assert verified.validation["runtime"] == runtime and "self-test" in verified.steps
    assert max(verified.validation["max_abs_diff"].values()) <= 1e-4  # the same file in the same runtime

    # the golden outputs are the device model's own, and they agree with the torch model it came from
    handle = load_device_model(tmp_path / "bundle" / manifest["model"], manifest, manifest["conversion"])
    golden = np.load(tmp_path / "bundle" / "golden_inputs.npz")
    feeds = {name: golden[name] for name in handle.input_names}
    runner = make_runner(handle, runtime, threads=1)
    try:
        device_out = runner.run(feeds)[0]
    finally:
        runner.close()
    assert np.max(np.abs(device_out - small_handle.run_torch(feeds)[0])) < 1e-3

    with pytest.raises(UnsupportedFormatError, match="compactai serve serves ONNX and OpenVINO"):
        LoadedVersion("cnn", "1", tmp_path / "bundle" / manifest["model"], 1, manifest, tmp_path / "bundle")

    model = tmp_path / "bundle" / manifest["model"]
    data = bytearray(model.read_bytes())
    data[-8] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleRefused) as refused:
        verify_bundle(tmp_path / "bundle", VerifyPolicy([public]))
    assert refused.value.reason == "hash-mismatch"


@pytest.mark.parametrize("suffix", [".tflite", ".pte"])
def test_a_device_file_without_its_export_record_is_refused_with_what_to_pass(signing_keys, tmp_path, suffix):
    private, _, _ = signing_keys
    model = tmp_path / "loose" / f"model{suffix}"
    model.parent.mkdir()
    model.write_bytes(b"\x00" * 64)
    with pytest.raises(BadInputError, match=r"without the record of its inputs.*compactai export MODEL --format"):
        build_bundle(model, tmp_path / "bundle", private, 1)
    assert not (tmp_path / "bundle").exists()
