"""Bundle format, keys, signing and the keygen / bundle / verify commands."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from compactai.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    BundleRefused,
    VerifyPolicy,
    build_bundle,
    canonical_bytes,
    generate_keypair,
    load_private_key,
    load_public_key,
    parse_manifest,
    verify_bundle,
)
from compactai.errors import BadInputError, ParameterError, SecurityError
from tests.bundle.helpers import run_cli


def test_keygen_private_key_is_owner_only_and_not_overwritten(keypair):
    private, public = keypair
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE" not in public.read_bytes()
    with pytest.raises(BadInputError, match="already exists"):
        generate_keypair(private.parent)


def test_world_readable_private_key_is_refused(keypair):
    private, _ = keypair
    os.chmod(private, 0o644)
    with pytest.raises(BadInputError, match="chmod 600"):
        load_private_key(private)


def test_bundle_from_onnx_file_verifies(keypair, small_onnx, tmp_path):
    private, public = keypair
    manifest = build_bundle(small_onnx, tmp_path / "b", load_private_key(private), 4, semver="1.2.3")
    assert (manifest["version"], manifest["semver"]) == (4, "1.2.3")
    assert [s["name"] for s in manifest["inputs"]] == ["image"]
    assert {f["path"] for f in manifest["files"]} == {"model.onnx", "golden_inputs.npz", "golden_outputs.npz"}
    raw = (tmp_path / "b" / MANIFEST_FILE).read_bytes()
    assert raw == canonical_bytes(parse_manifest(raw))  # the signed bytes are the canonical form
    with np.load(tmp_path / "b" / "golden_inputs.npz", allow_pickle=False) as golden:
        assert golden["image"].shape[1:] == (1, 16, 16)
    verified = verify_bundle(tmp_path / "b", VerifyPolicy([load_public_key(public)]))
    assert verified.steps[-1] == "self-test" and verified.validation["golden_samples"] >= 1


def test_archive_bundle_verifies(keypair, small_onnx, tmp_path):
    private, public = keypair
    build_bundle(small_onnx, tmp_path / "b.tar.gz", load_private_key(private), 1, now=1_800_000_000)
    verified = verify_bundle(tmp_path / "b.tar.gz", VerifyPolicy([load_public_key(public)], now=1_800_000_100),
                             workdir=tmp_path / "unpacked")
    assert verified.version == 1 and (tmp_path / "unpacked" / "model.onnx").exists()


def test_build_rejects_bad_parameters_and_pickle_sources(keypair, small_onnx, tmp_path):
    key = load_private_key(keypair[0])
    with pytest.raises(ParameterError, match="'version'"):
        build_bundle(small_onnx, tmp_path / "x", key, 0)
    with pytest.raises(ParameterError, match="semver"):
        build_bundle(small_onnx, tmp_path / "x", key, 1, semver="one")
    (tmp_path / "model.pt").write_bytes(b"\x80\x04junk")
    with pytest.raises(BadInputError, match="not a model file a bundle can hold"):
        build_bundle(tmp_path / "model.pt", tmp_path / "x", key, 1)
    build_bundle(small_onnx, tmp_path / "b", key, 1)
    with pytest.raises(BadInputError, match="never overwritten"):
        build_bundle(small_onnx, tmp_path / "b", key, 2)


def test_duplicate_keys_in_manifest_are_refused():
    with pytest.raises(BundleRefused, match="duplicate"):
        parse_manifest(b'{"version": 1, "version": 2}')


def test_refusal_is_a_security_error(keypair, small_onnx, tmp_path):
    private, public = keypair
    build_bundle(small_onnx, tmp_path / "b", load_private_key(private), 3)
    with pytest.raises(SecurityError) as info:
        verify_bundle(tmp_path / "b", VerifyPolicy([load_public_key(public)], highest_trusted=3))
    assert info.value.reason == "rollback" and info.value.exit_code == 1


@pytest.fixture
def output_dir(small_onnx, tmp_path: Path) -> Path:
    """A real compactai output directory: model.onnx + results.json with measured figures and a recipe."""
    from compactai import MeasureConfig, load_model, measure
    from compactai.results import save_model, write_results

    handle = load_model(small_onnx)
    handle.metadata["history"] = [{"technique": "quantize.dynamic", "params": {"per_channel": True},
                                   "decisions": {"quantized_ops": ["MatMul"]}}]
    out = tmp_path / "optimized"
    save_model(handle, out)
    figures = measure(handle, config=MeasureConfig(
        min_queries=20, min_seconds=0.05, warmup=3, throughput_min_batches=2, memory=False, energy=False))
    write_results(out, "quantize", handle, baseline={"onnxruntime": figures}, measurements={"onnxruntime": figures},
                  quality={"metric": "accuracy", "value": 0.98, "baseline": 0.99, "delta": -0.01})
    return out


def test_cli_bundle_carries_figures_and_recipe_then_verify(output_dir, keypair, tmp_path):
    private, public = keypair
    results = json.loads((output_dir / "results.json").read_text())
    made = run_cli("bundle", str(output_dir), "-o", str(tmp_path / "b"), "--key", str(private),
                   "--version", "7", "--expires-days", "30", "--json")
    assert made.returncode == 0, made.stderr
    manifest = json.loads(made.stdout)["manifest"]
    assert manifest["recipe"] == results["recipe"] == [{"technique": "quantize.dynamic",
                                                        "params": {"per_channel": True}}]
    assert manifest["lineage"][0]["decisions"] == {"quantized_ops": ["MatMul"]}
    assert manifest["measurements"]["onnxruntime"]["latency_p50_ms"] == \
        results["measurements"]["onnxruntime"]["latency_p50_ms"] > 0
    assert manifest["quality"]["value"] == 0.98 and manifest["source"]["command"] == "quantize"
    on_disk = json.loads((tmp_path / "b" / MANIFEST_FILE).read_text())
    assert on_disk["measurements"] == manifest["measurements"]

    ok = run_cli("verify", str(tmp_path / "b"), "--trusted-key", str(public), "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] is True

    (tmp_path / "b" / SIGNATURE_FILE).unlink()
    refused = run_cli("verify", str(tmp_path / "b"), "--trusted-key", str(public))
    assert refused.returncode == 1
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "missing-signature" in lines[0] and "Traceback" not in refused.stderr


def test_cli_keygen_and_bad_input_exit_codes(tmp_path):
    made = run_cli("keygen", "-o", str(tmp_path / "k"), "--json")
    assert made.returncode == 0, made.stderr
    data = json.loads(made.stdout)
    assert stat.S_IMODE(Path(data["private_key"]).stat().st_mode) == 0o600 and len(data["key_id"]) == 16
    again = run_cli("keygen", "-o", str(tmp_path / "k"))
    assert again.returncode == 2 and "already exists" in again.stderr
    missing = run_cli("verify", str(tmp_path / "nope"), "--trusted-key", data["public_key"])
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_cli_bundle_on_optimize_layout_carries_budget_and_flat_baseline(output_dir, keypair, tmp_path):
    """`compactai optimize` writes one flat baseline dict and its budget/task; both travel into the manifest."""
    results = json.loads((output_dir / "results.json").read_text())
    figures = results["measurements"]["onnxruntime"]
    results.update({"command": "optimize", "baseline": figures, "budget": {"latency_p90_ms": 5.0},
                    "task": {"name": "digits", "metric": "accuracy"}})
    (output_dir / "results.json").write_text(json.dumps(results))
    made = run_cli("bundle", str(output_dir), "-o", str(tmp_path / "b"), "--key", str(keypair[0]), "--version", "1")
    assert made.returncode == 0, made.stderr
    assert "x vs baseline" in made.stdout  # the speed-up row found the flat baseline
    manifest = json.loads((tmp_path / "b" / MANIFEST_FILE).read_text())
    assert manifest["budget"] == {"latency_p90_ms": 5.0} and manifest["task"]["name"] == "digits"
    assert manifest["baseline"]["latency_p50_ms"] == figures["latency_p50_ms"]
    assert manifest["source"]["command"] == "optimize"
