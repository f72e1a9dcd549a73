"""What `compactai serve` adds on top of ONNX Runtime, and what micro-batching buys (issue 17).

Model: the digits teacher quantized to static int8 when the trained teacher is cached (under
$COMPACTAI_CACHE_DIR or ~/.cache/compactai); otherwise the same digits architecture with
untrained weights, quantized the same way (latency depends on the architecture, not on the
weights; the table says which). Calibration uses the digits calibration split either way.

1. batch-1 p50: a bare ``InferenceSession.run`` vs a request to the server over loopback
   (keep-alive, JSON and the binary tensor extension); the difference is what the server adds.
   The floor: the same client against a bare uvicorn echo (a plain ASGI app that reads the body
   and answers a fixed response of the same size, same httptools/uvloop stack): what Python HTTP
   costs on this machine before the server does anything.
   The same on a model with the digits signature and almost no compute (one MatMul): with the
   int8 model's ~2.5 ms call, preemption on a shared machine moves both p50s by more than the
   server adds; on the trivial model the difference is the server's own cost.
2. ONNX Runtime CPU time per row by batch size (thread CPU time, so other processes on the
   machine do not inflate it): what micro-batching can save in compute.
3. throughput and p50/p99 at concurrency 32, without and with micro-batching, with the CPU
   used by the client and by the server over the run (they share the machine's cores).

The server runs as its own process (``compactai serve``); the client is a thread pool of
``http.client`` connections with pre-encoded bodies, so client work stays small. Run it under
the benchmark lock, alone if possible (the client and server share the machine's cores):

    flock /tmp/compactai-bench.lock .venv/bin/python benchmarks/serve.py [--seconds 5]

Prints a table and writes the "server" section of benchmarks/results/serve.json (other sections,
e.g. "drift", are kept).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from _results import write_section
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results" / "serve.json"
REPO = Path(__file__).resolve().parents[1]
THREADS = 1  # ONNX Runtime intra-op threads, the same for the bare session and the server


def build_model(work: Path) -> tuple[Path, str]:
    """(int8 ONNX file, description) of the digits model (trained if cached, else untrained weights)."""
    import torch

    from compactai import load_model
    from compactai.examples import cache_dir
    from compactai.examples.digits import WIDTHS, load_digits_splits, recipe_key
    from compactai.models.zoo import digits_resnet
    from compactai.techniques.quantize.ort_ptq import Int8Config, preprocess, quantize_int8

    splits = load_digits_splits()
    weights = cache_dir() / f"digits-teacher-{recipe_key()}.safetensors"
    module = digits_resnet(WIDTHS)
    if weights.exists():
        from safetensors.torch import load_file

        module.load_state_dict(load_file(str(weights)))
        what = "digits teacher (trained, cached), static int8"
    else:
        torch.manual_seed(0)
        what = "digits architecture, untrained weights (teacher not cached), static int8"
    module.eval()
    handle = load_model(module, torch.from_numpy(splits["test"].inputs["image"][:1]), name="digits")
    fp32 = handle.to_onnx(work / "fp32.onnx").path
    prepared = work / "prepared.onnx"
    preprocess(fp32, prepared, kind="cnn")
    int8 = quantize_int8(prepared, work / "int8.onnx", Int8Config(mode="static"), splits["calibration"], ["image"])
    return int8, what


def trivial_model(work: Path) -> Path:
    """The digits signature (image: (batch, 1, 32, 32) FP32 -> output: (batch, 10)) with one MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((1024, 10)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 1024], np.int64), "shape")
    nodes = [helper.make_node("Reshape", ["image", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["output"])]
    graph = helper.make_graph(nodes, "trivial",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 32, 32])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 10])],
                              [weight, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(work / "trivial.onnx"))
    return work / "trivial.onnx"


def bare_p50_ms(model: Path, image: np.ndarray, queries: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = THREADS, 1, 3
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for _ in range(50):
        session.run(names, {"image": image})
    times = []
    for _ in range(queries):
        start = time.perf_counter()
        session.run(names, {"image": image})
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3)


ECHO_BODY = json.dumps({"model_name": "digits", "model_version": "1", "parameters": {"served_by": "local"},
                        "outputs": [{"name": "output", "datatype": "FP32", "shape": [1, 10],
                                     "data": [0.123456] * 10}]}).encode()


def echo_server() -> None:
    """The floor: a bare ASGI app on uvicorn (httptools, uvloop) that reads the body and answers ECHO_BODY."""
    import uvicorn

    from compactai.runtime.server.app import bind_socket

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        while (await receive()).get("more_body", False):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(ECHO_BODY)).encode())]})
        await send({"type": "http.response.body", "body": ECHO_BODY})

    sock = bind_socket("127.0.0.1", 0)
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http="httptools",
                                  loop="uvloop")).run(sockets=[sock])


def ort_cpu_per_row_ms(model: Path, image: np.ndarray, batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> dict[str, float]:
    """Median thread CPU time per row of one ``InferenceSession.run`` at each batch size (1 intra-op
    thread: ONNX Runtime computes on the calling thread, so its CPU time is the call's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = THREADS, 1, 3
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    out: dict[str, float] = {}
    for batch in batches:
        x = np.repeat(image, batch, axis=0)
        for _ in range(5):
            session.run(None, {"image": x})
        times = []
        for _ in range(max(20, 320 // batch)):
            start = time.thread_time()
            session.run(None, {"image": x})
            times.append(time.thread_time() - start)
        out[str(batch)] = float(np.median(times) * 1e3 / batch)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """`compactai serve MODEL --port 0 --json ...` as a subprocess."""

    def __init__(self, model: Path | None, *args: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        command = [sys.executable, __file__, "--echo-server"] if model is None else [
            sys.executable, "-m", "compactai.cli", "serve", str(model), "--name", "digits", "--threads", str(THREADS),
            "--port", "0", "--json", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        assert self.process.stdout is not None
        self.port = int(json.loads(self.process.stdout.readline())["port"])

    def metrics(self) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request("GET", "/metrics")
        return connection.getresponse().read().decode()

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def bodies(image: np.ndarray, count: int) -> list[tuple[bytes, dict[str, str]]]:
    """Pre-encoded JSON and binary request bodies (different images, so no cache can help)."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        x = (image + 0.01 * rng.standard_normal(image.shape)).astype(np.float32)
        tensor = {"name": "image", "shape": list(x.shape), "datatype": "FP32"}
        if i % 2 == 0:
            out.append((json.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]}).encode(),
                        {"content-type": "application/json"}))
        else:
            header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}]}).encode()
            out.append((header + x.tobytes(), {"inference-header-content-length": str(len(header))}))
    return out


def post(connection: http.client.HTTPConnection, body: bytes, headers: dict[str, str]) -> None:
    connection.request("POST", "/v2/models/digits/infer", body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {data[:200]!r}")


def sequential_p50_ms(port: int, requests: list[tuple[bytes, dict[str, str]]], queries: int) -> float:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for body, headers in requests[:20]:
        post(connection, body, headers)
    times = []
    for i in range(queries):
        body, headers = requests[i % len(requests)]
        start = time.perf_counter()
        post(connection, body, headers)
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1e3)


def closed_loop(port: int, requests: list[tuple[bytes, dict[str, str]]], concurrency: int,
                seconds: float, server_pid: int) -> dict[str, float]:
    """``concurrency`` clients, each sending its next request when the last answer is back."""
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()
    go = threading.Event()
    deadline = [0.0]

    def client(index: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        post(connection, *requests[index % len(requests)])  # connect and warm up before the clock starts
        go.wait()
        mine, i = [], index
        while time.perf_counter() < deadline[0]:
            body, headers = requests[i % len(requests)]
            i += concurrency
            start = time.perf_counter()
            try:
                post(connection, body, headers)
                mine.append(time.perf_counter() - start)
            except Exception:  # noqa: BLE001 (counted: a benchmark reports failures, it does not stop)
                with lock:
                    failures[0] += 1
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    start = time.perf_counter()
    client_cpu, server_cpu = time.process_time(), cpu_seconds(server_pid)
    deadline[0] = start + seconds
    go.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    client_cpu, server_cpu = time.process_time() - client_cpu, cpu_seconds(server_pid) - server_cpu
    return {"requests": len(latencies), "failed": failures[0], "throughput_rps": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(latencies, 50) * 1e3), "p99_ms": float(np.percentile(latencies, 99) * 1e3),
            # CPU cores busy on average (1.0 = one core) over the run, of the 2 the machine has
            "client_cpu_cores": client_cpu / elapsed, "server_cpu_cores": server_cpu / elapsed, "seconds": elapsed}


def merge_rounds(runs: list[dict[str, float]]) -> dict[str, float]:
    """Totals over rounds; p50/p99 and throughput as the median of the rounds'."""
    total_cpu = sum(r["server_cpu_cores"] * r["seconds"] for r in runs)
    merged = {"requests": sum(r["requests"] for r in runs), "failed": sum(r["failed"] for r in runs)}
    for key in ("throughput_rps", "p50_ms", "p99_ms", "client_cpu_cores", "server_cpu_cores"):
        merged[key] = float(np.median([r[key] for r in runs]))
    merged["requests_per_server_cpu_s"] = merged["requests"] / total_cpu if total_cpu else float("nan")
    return merged


def histogram_mean(text: str, name: str) -> float | None:
    total = sum(float(v) for v in re.findall(rf"^{name}_sum{{[^}}]*}} (\S+)$", text, re.M))
    count = sum(float(v) for v in re.findall(rf"^{name}_count{{[^}}]*}} (\S+)$", text, re.M))
    return total / count if count else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run (all rounds)")
    parser.add_argument("--queries", type=int, default=2000, help="batch-1 queries for the p50 figures")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved unbatched/batched rounds")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)  # the floor, run as a subprocess
    args = parser.parse_args()
    if args.echo_server:
        echo_server()
        return
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="compactai-bench-serve-"))
    console = Console()
    console.print("building the int8 digits model...")
    model, what = build_model(work)
    image = np.random.default_rng(1).standard_normal((1, 1, 32, 32)).astype(np.float32)
    requests = bodies(image, 64)
    json_requests, binary_requests = requests[0::2], requests[1::2]

    bare = bare_p50_ms(model, image, args.queries)
    per_row = ort_cpu_per_row_ms(model, image)
    echo = Server(None)
    try:
        floor_json = sequential_p50_ms(echo.port, json_requests, args.queries)
        floor_binary = sequential_p50_ms(echo.port, binary_requests, args.queries)
    finally:
        echo.stop()
    trivial = trivial_model(work)
    trivial_bare = bare_p50_ms(trivial, image, args.queries)
    server = Server(trivial)
    try:
        trivial_json = sequential_p50_ms(server.port, json_requests, args.queries)
        trivial_binary = sequential_p50_ms(server.port, binary_requests, args.queries)
    finally:
        server.stop()
    server = Server(model)
    try:
        json_p50 = sequential_p50_ms(server.port, json_requests, args.queries)
        binary_p50 = sequential_p50_ms(server.port, binary_requests, args.queries)
        text = server.metrics()
        in_server = histogram_mean(text, "compactai_request_duration_seconds")
        compute = histogram_mean(text, "compactai_compute_duration_seconds")
        # both servers up at once, loaded in turn: interleaved rounds see the same machine load
        batching = Server(model, "--max-batch", str(args.concurrency), "--max-delay-ms", "2")
        try:
            runs: dict[str, list[dict[str, float]]] = {"unbatched": [], "batched": []}
            for _ in range(args.rounds):
                for label, target in (("unbatched", server), ("batched", batching)):
                    runs[label].append(closed_loop(target.port, json_requests, args.concurrency,
                                                   args.seconds / args.rounds, target.process.pid))
            batch_mean = histogram_mean(batching.metrics(), "compactai_batch_size")
        finally:
            batching.stop()
    finally:
        server.stop()
    unbatched, batched = merge_rounds(runs["unbatched"]), merge_rounds(runs["batched"])
    speedups = [b["throughput_rps"] / u["throughput_rps"] for u, b in zip(runs["unbatched"], runs["batched"])]

    report: dict[str, Any] = {
        "model": what, "threads": THREADS, "queries": args.queries, "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0], "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "batch1": {"bare_ort_p50_ms": bare, "server_json_p50_ms": json_p50, "server_binary_p50_ms": binary_p50,
                   "added_json_p50_ms": json_p50 - bare, "added_binary_p50_ms": binary_p50 - bare,
                   "floor_echo_json_p50_ms": floor_json, "floor_echo_binary_p50_ms": floor_binary,
                   "in_server_mean_ms": in_server and in_server * 1e3, "compute_mean_ms": compute and compute * 1e3},
        "batch1_trivial_model": {"bare_ort_p50_ms": trivial_bare, "server_json_p50_ms": trivial_json,
                                 "server_binary_p50_ms": trivial_binary,
                                 "added_json_p50_ms": trivial_json - trivial_bare,
                                 "added_binary_p50_ms": trivial_binary - trivial_bare},
        "ort_cpu_ms_per_row_by_batch": per_row,
        f"concurrency_{args.concurrency}": {"seconds": args.seconds, "unbatched": unbatched,
                                            "batched": {**batched, "mean_batch_rows": batch_mean},
                                            "rounds": args.rounds, "rounds_detail": runs,
                                            "speedup_by_round": speedups,
                                            "speedup": float(np.median(speedups)),
                                            # requests per CPU-second of the server: what batching saves in work,
                                            # whatever share of the cores the server got from a busy machine
                                            "efficiency_ratio": batched["requests_per_server_cpu_s"]
                                            / unbatched["requests_per_server_cpu_s"]},
    }
    table = Table(title=f"compactai serve: {what}, {THREADS} intra-op thread, load average "
                        f"{load_start[0]:.1f} at the start, {report['load_average']:.1f} at the end, on "
                        f"{report['cpus']} CPUs", title_justify="left")
    for column in ("figure", "value"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    b1 = report["batch1"]
    rows = [("bare ONNX Runtime p50 (ms)", b1["bare_ort_p50_ms"]), ("server JSON p50 (ms)", json_p50),
            ("server binary p50 (ms)", binary_p50), ("added p50, JSON (ms)", b1["added_json_p50_ms"]),
            ("added p50, binary (ms)", b1["added_binary_p50_ms"]),
            ("floor: bare uvicorn echo p50, JSON / binary body (ms)", f"{floor_json:.3f} / {floor_binary:.3f}"),
            ("trivial model (same signature): added p50, JSON / binary (ms)",
             f"{trivial_json - trivial_bare:.3f} / {trivial_binary - trivial_bare:.3f}"),
            ("in-server mean, body read to response (ms)", b1["in_server_mean_ms"]),
            ("compute mean in server (ms)", b1["compute_mean_ms"])]
    for label, run in (("unbatched", unbatched), ("micro-batched", batched)):
        rows += [(f"c{args.concurrency} {label} throughput (req/s)", run["throughput_rps"]),
                 (f"c{args.concurrency} {label} p50 / p99 (ms)", f"{run['p50_ms']:.2f} / {run['p99_ms']:.2f}"),
                 (f"c{args.concurrency} {label} failed", run["failed"]),
                 (f"c{args.concurrency} {label} CPU cores busy, client / server",
                  f"{run['client_cpu_cores']:.2f} / {run['server_cpu_cores']:.2f}")]
    rows += [("requests per server CPU-second, unbatched / batched",
              f"{unbatched['requests_per_server_cpu_s']:.0f} / {batched['requests_per_server_cpu_s']:.0f}"),
             ("ORT CPU ms per row at batch " + ", ".join(per_row), " / ".join(f"{v:.2f}" for v in per_row.values())),
             ("mean rows per batch", batch_mean), ("throughput with / without batching",
                                                   report[f"concurrency_{args.concurrency}"]["speedup"])]
    for label, value in rows:
        table.add_row(label, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    write_section(RESULTS, "server", report)  # other sections (e.g. "drift") belong to other benchmarks
    console.print(f"wrote the 'server' section of {RESULTS}")


if __name__ == "__main__":
    main()
