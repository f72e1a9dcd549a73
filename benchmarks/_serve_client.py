"""The client side of benchmarks/serve.py: `compactai serve` as a subprocess, a keep-alive
``http.client`` client with pre-encoded bodies, a closed-loop load of N such clients, and the
CPU the server and the client used (Linux /proc)."""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
Request = tuple[bytes, dict[str, str]]  # a pre-encoded body and its headers


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """``command`` (``compactai serve MODEL --port 0 --json ...`` or the echo floor) as a subprocess."""

    def __init__(self, command: list[str], name: str = "digits") -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.path = f"/v2/models/{name}/infer"
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        assert self.process.stdout is not None
        self.port = int(json.loads(self.process.stdout.readline())["port"])

    @classmethod
    def serve(cls, model: Path, name: str, threads: int, *args: str) -> Server:
        return cls([sys.executable, "-m", "compactai.cli", "serve", str(model), "--name", name, "--threads",
                    str(threads), "--port", "0", "--json", *args], name)

    def metrics(self) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request("GET", "/metrics")
        return connection.getresponse().read().decode()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def post(connection: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str]) -> None:
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")


def sequential_p50_ms(server: Server, requests: list[Request], queries: int) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for body, headers in requests[:20]:
        post(connection, server.path, body, headers)
    times = []
    for i in range(queries):
        body, headers = requests[i % len(requests)]
        start = time.perf_counter()
        post(connection, server.path, body, headers)
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3)


def lean_p50_ms(server: Server, requests: list[Request], queries: int) -> float:
    """Batch-1 p50 with a lean client: one keep-alive socket, each request pre-built as HTTP/1.1 bytes
    and sent with one sendall, the response read by its Content-Length. http.client's own work
    (building headers, parsing the response with the email package) is about 0.2 ms per request on
    this machine, which the server did not add; this client costs a few tens of microseconds."""
    import socket

    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    messages = [f"POST {server.path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {len(body)}\r\n".encode()
                + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n" + body
                for body, headers in requests]

    def one(message: bytes) -> None:
        sock.sendall(message)
        data = b""
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("the server closed the connection")
            data += chunk
            end = data.find(b"\r\n\r\n")
            if end < 0:
                continue
            head = data[:end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:].split(b"\r\n", 1)[0])
            if len(data) >= end + 4 + length:
                if not data.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"{data[:200]!r}")
                return

    try:
        for message in messages[:20]:
            one(message)
        times = []
        for i in range(queries):
            start = time.perf_counter()
            one(messages[i % len(messages)])
            times.append(time.perf_counter() - start)
    finally:
        sock.close()
    return float(np.percentile(times, 50) * 1e3)


def closed_loop(server: Server, requests: list[Request], concurrency: int, seconds: float) -> dict[str, float]:
    """``concurrency`` clients, each sending its next request when the last answer is back."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    go = threading.Event()
    deadline = [0.0]

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        post(connection, server.path, *requests[index % len(requests)])  # connect and warm up first
        go.wait()
        mine, i = [], index
        while time.perf_counter() < deadline[0]:
            body, headers = requests[i % len(requests)]
            i += concurrency
            start = time.perf_counter()
            try:
                post(connection, server.path, body, headers)
                mine.append(time.perf_counter() - start)
            except Exception:  # noqa: BLE001 (counted: a benchmark reports failures, it does not stop)
                with lock:
                    failures[0] += 1
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    start = time.perf_counter()
    client_cpu, server_cpu = time.process_time(), cpu_seconds(server.process.pid)
    deadline[0] = start + seconds
    go.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    client_cpu, server_cpu = time.process_time() - client_cpu, cpu_seconds(server.process.pid) - server_cpu
    return {"requests": len(latencies), "failed": failures[0], "throughput_rps": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(latencies, 50) * 1e3), "p99_ms": float(np.percentile(latencies, 99) * 1e3),
            # CPU cores busy on average (1.0 = one core) over the run, of the ones the machine has
            "client_cpu_cores": client_cpu / elapsed, "server_cpu_cores": server_cpu / elapsed, "seconds": elapsed,
            "server_cpu_s": server_cpu}


def merge_rounds(runs: list[dict[str, float]]) -> dict[str, float]:
    """Totals over rounds; p50/p99 and throughput as the median of the rounds'; server CPU per request."""
    total_cpu = sum(r["server_cpu_s"] for r in runs)
    merged = {"requests": sum(r["requests"] for r in runs), "failed": sum(r["failed"] for r in runs)}
    for key in ("throughput_rps", "p50_ms", "p99_ms", "client_cpu_cores", "server_cpu_cores"):
        merged[key] = float(np.median([r[key] for r in runs]))
    merged["requests_per_server_cpu_s"] = merged["requests"] / total_cpu if total_cpu else float("nan")
    merged["server_cpu_ms_per_request"] = 1e3 * total_cpu / merged["requests"] if merged["requests"] else float("nan")
    return merged


def interleaved(servers: dict[str, Server], requests: list[Request], concurrency: int, seconds: float,
                rounds: int) -> dict[str, list[dict[str, float]]]:
    """Closed-loop rounds on each server in turn (all up at once), so each sees the same machine load."""
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in servers}
    for _ in range(rounds):
        for label, server in servers.items():
            runs[label].append(closed_loop(server, requests, concurrency, seconds / rounds))
    return runs


def histogram_mean(text: str, name: str) -> float | None:
    total = sum(float(v) for v in re.findall(rf"^{name}_sum{{[^}}]*}} (\S+)$", text, re.M))
    count = sum(float(v) for v in re.findall(rf"^{name}_count{{[^}}]*}} (\S+)$", text, re.M))
    return total / count if count else None


def load_summary(start: tuple[float, float, float]) -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_average": os.getloadavg()[0], "load_average_start": start,
            "load_average_end": os.getloadavg()}
