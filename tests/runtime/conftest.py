"""Fixtures for the update agent: keys, tiny ONNX models, a bundle factory, an install dir at version 1,
and a real HTTP server on 127.0.0.1 that serves bundles (also endlessly or one byte at a time)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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


class BundleServer:
    """Serves bundle directories under /<name>/...; ``endless`` paths stream without Content-Length;
    ``trickle`` paths announce the real size but send one byte every ``trickle[path]`` seconds
    (a slow-retrieval attack), for at most ``trickle_limit_s`` seconds so that a test always ends."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.endless: set[str] = set()
        self.trickle: dict[str, float] = {}
        self.trickle_limit_s = 90.0
        self.sent: dict[str, int] = {}
        self.trickling: dict[str, int] = {}  # bytes of each trickled path sent so far (live)
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                if self.path in server.endless:
                    self.send_response(200)
                    self.end_headers()
                    block, sent = b"\0" * 65536, 0
                    try:
                        while sent < 64 * 1024 * 1024:  # an "endless data" attack, bounded for the test
                            self.wfile.write(block)
                            sent += len(block)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    server.sent[self.path] = sent
                    return
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in server.trickle:
                    self._trickle(body, server.trickle[self.path])
                    return
                self.wfile.write(body)

            def _trickle(self, body: bytes, interval: float) -> None:
                sent = 0
                try:
                    for _ in range(int(server.trickle_limit_s / interval)):
                        if sent == len(body) or server.stop.wait(interval):
                            break
                        self.wfile.write(body[sent:sent + 1])
                        self.wfile.flush()
                        sent += 1
                        server.trickling[self.path] = sent
                except (BrokenPipeError, ConnectionResetError):
                    pass
                server.sent[self.path] = sent

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def publish(self, name: str, bundle: Path) -> str:
        for path in bundle.rglob("*"):
            if path.is_file():
                self.routes[f"/{name}/{path.relative_to(bundle).as_posix()}"] = path.read_bytes()
        return f"{self.url}/{name}/"


@pytest.fixture
def server() -> Iterator[BundleServer]:
    served = BundleServer()
    thread = threading.Thread(target=served.httpd.serve_forever, daemon=True)
    thread.start()
    yield served
    served.stop.set()
    served.httpd.shutdown()
    served.httpd.server_close()
