"""The verifier's ``pickle`` step finds pickles by parsing, in signed bundles that pass every earlier step."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import compactai
from compactai.bundle import (
    BundleRefused,
    VerifyPolicy,
    build_bundle,
    generate_keypair,
    load_private_key,
    load_public_key,
    verify_bundle,
    write_signed_manifest,
)
from compactai.bundle.manifest import MANIFEST_FILE


class Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _zip_with_pickle(path: Path, marker: Path) -> None:
    torch.save({"x": Payload(marker)}, path)


HOSTILE = {
    "notes.bin": lambda path, marker: path.write_bytes(pickle.dumps(Payload(marker), protocol=0)),
    "extra.npz": lambda path, marker: np.savez(path, a=np.array([Payload(marker)], dtype=object)),
    "extra.npy": lambda path, marker: np.save(path, np.array([Payload(marker)], dtype=object)),
    "weights.safetensors": lambda path, marker: path.write_bytes(pickle.dumps(Payload(marker), protocol=2)),
    "model.pt2": _zip_with_pickle,
}


@pytest.fixture
def signed(tmp_path: Path, small_onnx: Path):
    private, public = generate_keypair(tmp_path / "keys")
    root = tmp_path / "bundle"
    build_bundle(small_onnx, root, load_private_key(private), 1)
    return root, load_private_key(private), public


def _add_and_resign(root: Path, key, name: str, marker: Path) -> None:
    HOSTILE[name](root / name, marker)
    manifest = json.loads((root / MANIFEST_FILE).read_text())
    write_signed_manifest(root, manifest, key)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_signed_bundle_with_a_pickle_member_is_refused_at_the_pickle_step(signed, tmp_path, name):
    root, key, public = signed
    marker = tmp_path / "marker"
    _add_and_resign(root, key, name, marker)
    with pytest.raises(BundleRefused) as info:
        verify_bundle(root, VerifyPolicy([load_public_key(public)]))
    assert info.value.reason == "pickle", str(info.value)
    assert name in str(info.value)
    assert not marker.exists()


def test_object_golden_inputs_are_refused_before_the_self_test(signed, tmp_path):
    root, key, public = signed
    marker = tmp_path / "marker"
    np.savez(root / "golden_inputs.npz", image=np.array([Payload(marker)], dtype=object))
    write_signed_manifest(root, json.loads((root / MANIFEST_FILE).read_text()), key)
    with pytest.raises(BundleRefused) as info:
        verify_bundle(root, VerifyPolicy([load_public_key(public)]))
    assert info.value.reason == "pickle" and "object-dtype" in str(info.value)
    assert not marker.exists()


def test_clean_bundle_passes_the_pickle_step(signed):
    root, _, public = signed
    assert "pickle" in verify_bundle(root, VerifyPolicy([load_public_key(public)]), validate=False).steps


@pytest.mark.slow
def test_verify_and_update_cli_refuse_the_bundle(signed, tmp_path):
    root, key, public = signed
    marker = tmp_path / "marker"
    _add_and_resign(root, key, "notes.bin", marker)
    env = {**os.environ, "PYTHONPATH": str(Path(compactai.__file__).resolve().parents[1])}
    for command in (["verify", str(root), "-t", str(public)],
                    ["update", "--source", str(root), "--install-dir", str(tmp_path / "device"), "-t", str(public)]):
        result = subprocess.run([sys.executable, "-m", "compactai.cli", *command], capture_output=True, text=True,
                                timeout=600, check=False, env=env)
        assert result.returncode == 1, (command, result.stderr[-2000:])  # a refused bundle exits 1 (documented)
        assert "pickle" in result.stdout + result.stderr, (command, result.stdout, result.stderr)
        assert not marker.exists()
