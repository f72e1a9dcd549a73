"""Real servers for the serve tests: uvicorn on 127.0.0.1 (free port) in a thread, or the CLI in a subprocess.

Models are the update tests' tiny ONNX files (``y = x @ (scale * I)``, x of shape (batch, 4)),
packed as real signed bundles by ``make_bundle`` (tests/runtime/conftest.py).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from compactai.runtime.server import ModelServer, ServeConfig, bind_socket, make_uvicorn
from compactai.runtime.server.metrics import EventLog

REPO = Path(__file__).resolve().parents[3]


class RunningServer:
    """A ModelServer behind a real uvicorn on 127.0.0.1, in a background thread."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self.sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.uvicorn = make_uvicorn(server)
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., RunningServer]]:
    """serve(source, **ServeConfig fields) -> a started RunningServer (stopped after the test).

    Its structured log lines are kept in ``running.log`` (a StringIO) for assertions."""
    started: list[RunningServer] = []

    def start(source: Path | str, **config: Any) -> RunningServer:
        log_stream = io.StringIO()
        server = ModelServer(source, ServeConfig(**config), log=EventLog(log_stream))
        running = RunningServer(server).start()
        running.log = log_stream  # type: ignore[attr-defined]
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


def events(running: RunningServer, name: str) -> list[dict[str, Any]]:
    stream = running.log  # type: ignore[attr-defined]
    return [e for e in map(json.loads, stream.getvalue().splitlines()) if e["event"] == name]


def infer_body(rows: list[list[float]], name: str = "x", **extra: Any) -> dict[str, Any]:
    flat = [v for row in rows for v in row]
    return {"inputs": [{"name": name, "shape": [len(rows), len(rows[0])], "datatype": "FP32", "data": flat}],
            **extra}


def wait_for(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def cli_server(args: list[str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``compactai serve ARGS --port 0 --json`` in a subprocess; yields (url, process); stderr -> log_path."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "compactai.cli", "serve", *args, "--port", "0", "--json"],
                                   stdout=subprocess.PIPE, stderr=log, env=env, cwd=REPO)
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            if not line:
                process.wait(30)
                raise AssertionError(f"compactai serve exited {process.returncode}: {log_path.read_text()[-2000:]}")
            start = json.loads(line)
            yield f"http://127.0.0.1:{start['port']}", process
        finally:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def log_events(log_path: Path, name: str) -> list[dict[str, Any]]:
    out = []
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == name:
                out.append(entry)
    return out
