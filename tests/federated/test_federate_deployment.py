"""`compactai federate --engine deployment` against a real SuperLink and three SuperNodes, each its
own process on 127.0.0.1 (insecure gRPC on loopback only); every process is stopped afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="needs Flower: make install-federated, then run these tests with build/fed-venv/bin/python (make test does)")

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
NODES = 3


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def wait_for_port(port: int, process: subprocess.Popen, log: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, f"process exited early:\n{log.read_text()[-2000:]}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.5)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {seconds} s:\n{log.read_text()[-2000:]}")


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (a SuperLink/SuperNode and the app processes it started), then SIGKILL."""
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    for process in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def live_members(groups: set[int]) -> list[str]:
    """Processes still running in the given process groups."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid", "status", "cmdline"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) in groups and process.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(" ".join(process.info["cmdline"] or [])[:120])
    return found


@pytest.fixture
def superlink(tmp_path: Path) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """A SuperLink and three SuperNodes (partitions 0..2); yields the Control API address."""
    serverappio, fleet, control, *clientappio = free_ports(3 + NODES)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    processes: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        process = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
                                   env={**env, "FLWR_HOME": str(tmp_path / f"home-{name}")})
        processes.append(process)
        return process

    try:
        link = start("superlink", [str(BIN / "flower-superlink"), "--insecure",
                                   "--serverappio-api-address", f"127.0.0.1:{serverappio}",
                                   "--fleet-api-address", f"127.0.0.1:{fleet}",
                                   "--control-api-address", f"127.0.0.1:{control}",
                                   "--database", str(tmp_path / "state.db"),
                                   "--disable-runtime-dependency-installation"])
        wait_for_port(fleet, link, tmp_path / "superlink.log")
        wait_for_port(control, link, tmp_path / "superlink.log")
        for node in range(NODES):
            start(f"supernode{node}", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                       f"127.0.0.1:{fleet}", "--clientappio-api-address",
                                       f"127.0.0.1:{clientappio[node]}", "--node-config",
                                       f"partition-id={node} num-partitions={NODES}"])
        yield f"127.0.0.1:{control}", processes
    finally:
        stop(processes)
        # every process of those groups is gone (zombies left to an init that does not reap are not running)
        assert live_members({p.pid for p in processes}) == []


def test_three_rounds_through_superlink_and_three_supernodes(superlink: tuple[str, list[subprocess.Popen]],
                                                             tmp_path: Path) -> None:
    address, processes = superlink
    done = subprocess.run(
        [sys.executable, "-c", "from compactai.cli import main; main()", "federate", "--example", "digits",
         "--engine", "deployment", "--superlink", address, "--insecure", "--clients", str(NODES), "--rounds", "3",
         "--model", "mlp:16", "--partition", "label-skew:0.5", "--no-alone", "--json", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=1500, check=False,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["engine"] == "deployment"
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(r["clients_trained"] == NODES and r["federated"]["accuracy"] is not None for r in rounds[1:])
    assert rounds[-1]["centralised"]["accuracy"] > rounds[0]["centralised"]["accuracy"] + 0.2
    assert summary["test_accuracy"] > summary["round0_test_accuracy"] + 0.2
    assert (tmp_path / "out" / "model.onnx").exists() and (tmp_path / "out" / "report.html").exists()
    assert all(p.poll() is None for p in processes)  # the SuperLink and SuperNodes outlive a run

