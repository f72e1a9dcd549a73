"""Fixtures for the update agent: keys, tiny ONNX models, a bundle factory, an install dir at version 1."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compactai.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    build_bundle,
    canonical_bytes,
    generate_keypair,
    load_private_key,
    load_public_key,
    write_signed_manifest,
)
from compactai.bundle.signing import sign
from compactai.runtime import ProbationPolicy, UpdateAgent


def tiny_model(path: Path, scale: float = 2.0, op: str = "MatMul") -> Path:
    """y = x @ (scale * I) (or y = Log(x) with op="Log"), x of shape (batch, 4)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    if op == "Log":
        graph = helper.make_graph([helper.make_node("Log", ["x"], ["y"])], "log", [x], [y])
    else:
        weight = numpy_helper.from_array(np.eye(4, dtype=np.float32) * scale, "w")
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [x], [y], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def keys(tmp_path: Path):
    private, public = generate_keypair(tmp_path / "keys")
    return load_private_key(private), load_public_key(public), public


@pytest.fixture
def make_bundle(tmp_path: Path, keys) -> Callable[..., Path]:
    """make_bundle(version, scale=..., op=..., key=..., **build_kwargs) -> a validly signed bundle directory."""
    counter = iter(range(10_000))

    def make(version: int, *, scale: float = 2.0, op: str = "MatMul", key=None, out: str | None = None,
             **kwargs) -> Path:
        n = next(counter)
        model = tiny_model(tmp_path / f"model-{n}.onnx", scale=scale, op=op)
        target = tmp_path / (out or f"bundle-{n}-v{version}")
        build_bundle(model, target, key or keys[0], version, **kwargs)
        return target

    return make


@pytest.fixture
def agent_v1(tmp_path: Path, keys, make_bundle) -> UpdateAgent:
    """An agent whose install directory runs version 1 (committed)."""
    agent = UpdateAgent(tmp_path / "install", [keys[1]], probation=ProbationPolicy(queries=4))
    result = agent.update(make_bundle(1))
    assert result.status == "committed", result
    return agent


@pytest.fixture
def resign() -> Callable[..., None]:
    """resign(bundle, private_key, mutate=None): re-sign after ``mutate(manifest)``, as a compromised or
    buggy publisher would; without ``mutate`` the file list is rebuilt from the files on disk."""

    def do(bundle: Path, private_key, mutate=None) -> None:
        manifest = json.loads((bundle / MANIFEST_FILE).read_text())
        if mutate is None:
            write_signed_manifest(bundle, manifest, private_key)
            return
        mutate(manifest)
        raw = canonical_bytes(manifest)
        (bundle / MANIFEST_FILE).write_bytes(raw)
        (bundle / SIGNATURE_FILE).write_bytes(sign(private_key, raw))

    return do
