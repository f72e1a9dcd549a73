"""A bundle that carries an OpenVINO IR: built, verified (self-test in OpenVINO), refused when its
weights change, and served by a real `compactai serve` on 127.0.0.1 to a real HTTP client."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from compactai.bundle import (
    BundleRefused,
    VerifyPolicy,
    build_bundle,
    generate_keypair,
    load_private_key,
    verify_bundle,
)
from compactai.bundle.signing import load_public_key
from compactai.measure import make_runner, runtime_plugin
from tests.runtime.server.conftest import cli_server

pytestmark = pytest.mark.skipif(not runtime_plugin("openvino").available(),
                                reason="OpenVINO is not installed: pip install -c constraints.txt 'compactai[openvino]'")


@pytest.fixture
def ir_bundle(small_handle, tmp_path: Path) -> tuple[Path, Path, object]:
    converted = runtime_plugin("openvino").convert(small_handle, tmp_path / "ir")
    private, public = generate_keypair(tmp_path / "keys")
    bundle = tmp_path / "bundle"
    manifest = build_bundle(tmp_path / "ir", bundle, load_private_key(private), 1, name="cnn")
    assert manifest["model"] == "model.xml" and manifest["runtime"] == "openvino"
    assert {"model.xml", "model.bin"} <= {entry["path"] for entry in manifest["files"]}
    return bundle, public, converted


def test_openvino_bundle_verifies_in_openvino(ir_bundle) -> None:
    bundle, public, _ = ir_bundle
    verified = verify_bundle(bundle, VerifyPolicy([load_public_key(public)]))
    assert verified.validation["runtime"] == "openvino" and "self-test" in verified.steps
    assert max(verified.validation["max_abs_diff"].values()) <= 1e-4


def test_changed_weights_are_refused(ir_bundle) -> None:
    bundle, public, _ = ir_bundle
    weights = bundle / "model.bin"
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"  # the last float becomes +inf
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleRefused) as refused:
        verify_bundle(bundle, VerifyPolicy([load_public_key(public)]))
    assert refused.value.reason == "hash-mismatch"


def test_serve_answers_from_the_openvino_model(ir_bundle, tmp_path: Path) -> None:
    bundle, public, converted = ir_bundle
    rows = np.random.default_rng(3).standard_normal((2, 1, 16, 16)).astype(np.float32)
    name = converted.input_names[0]
    expected = make_runner(converted, "openvino", threads=1).run({name: rows})[0]
    args = [str(bundle), "--trusted-key", str(public), "--threads", "1"]
    with cli_server(args, tmp_path / "serve.log") as (url, _process), httpx.Client(base_url=url, timeout=60) as client:
        meta = client.get("/v2/models/cnn").json()
        assert meta["platform"] == "openvino_ir"
        assert meta["inputs"] == [{"name": name, "datatype": "FP32", "shape": [-1, 1, 16, 16]}]
        body = {"inputs": [{"name": name, "shape": list(rows.shape), "datatype": "FP32",
                            "data": rows.ravel().tolist()}]}
        answer = client.post("/v2/models/cnn/infer", json=body)
        assert answer.status_code == 200, answer.text
        output = answer.json()["outputs"][0]
        got = np.asarray(output["data"], np.float32).reshape(output["shape"])
    assert got.shape == expected.shape == (2, 10)
    assert np.max(np.abs(got - expected)) < 1e-4
