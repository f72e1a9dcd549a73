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
   used by the client and by the server over the run (they share the machine's cores). Both
   servers run --threads 1 with --workers = CPUs (one ONNX Runtime call per core at once).

``--model minilm``: the same 2. and 3. (and the batch-1 p50) on all-MiniLM-L6-v2 quantized to
dynamic int8 (``create_technique("quantize", mode="dynamic")``), test sentences padded to
SEQUENCE tokens, JSON requests with binary outputs; its per-row cost falls with the batch size,
so it shows what micro-batching gives where the model allows it (section "server_minilm").

The server runs as its own process (``compactai serve``); the client is a thread pool of
``http.client`` connections with pre-encoded bodies, so client work stays small. Run it under
the benchmark lock, alone if possible (the client and server share the machine's cores):

    flock /tmp/compactai-bench.lock .venv/bin/python benchmarks/serve.py [--model minilm] [--seconds 5]

Prints a table and writes the "server" (or "server_minilm") section of
benchmarks/results/serve.json (other sections, e.g. "drift", are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _results import write_section
from _serve_client import (
    Request,
    Server,
    histogram_mean,
    interleaved,
    lean_p50_ms,
    load_summary,
    merge_rounds,
    sequential_p50_ms,
)
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results" / "serve.json"
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


def session(model: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = THREADS, 1, 3
    return ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])


def bare_p50_ms(model: Path, feeds: dict[str, np.ndarray], queries: int) -> float:
    run = session(model)
    names = [o.name for o in run.get_outputs()]
    for _ in range(50):
        run.run(names, feeds)
    times = []
    for _ in range(queries):
        start = time.perf_counter()
        run.run(names, feeds)
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


def ort_cpu_per_row_ms(model: Path, feeds: dict[str, np.ndarray],
                       batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32)) -> dict[str, float]:
    """Median thread CPU time per row of one ``InferenceSession.run`` on the first rows of ``feeds``
    at each batch size (1 intra-op thread: ONNX Runtime computes on the calling thread, so its CPU
    time is the call's)."""
    run = session(model)
    out: dict[str, float] = {}
    for batch in batches:
        x = {name: np.ascontiguousarray(a[:batch]) for name, a in feeds.items()}
        for _ in range(5):
            run.run(None, x)
        times = []
        for _ in range(max(20, 320 // batch)):
            start = time.thread_time()
            run.run(None, x)
            times.append(time.thread_time() - start)
        out[str(batch)] = float(np.median(times) * 1e3 / batch)
    return out


def bodies(image: np.ndarray, count: int) -> list[Request]:
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


SEQUENCE = 32  # MiniLM requests: test sentences of at most this many tokens, padded to it (batches need one shape)


def build_minilm(work: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """(dynamic int8 MiniLM ONNX file, test-sentence feeds padded to SEQUENCE tokens)."""
    from compactai import load_example
    from compactai.techniques.base import Context, create_technique

    example = load_example("minilm")
    quantized = create_technique("quantize", mode="dynamic").apply(example.handle,
                                                                    Context(task=example.task, work_dir=work))
    test = example.task.splits["test"].inputs
    keep = test["attention_mask"].sum(axis=1) <= SEQUENCE
    return Path(quantized.path), {name: np.ascontiguousarray(a[keep][:, :SEQUENCE]) for name, a in test.items()}


def minilm_bodies(feeds: dict[str, np.ndarray], count: int) -> list[Request]:
    """JSON requests of one sentence each (INT64 token ids and mask), outputs asked for in binary
    (a 32 x 384 float tensor written as JSON text would cost more than the model's call)."""
    out = []
    for i in range(count):
        inputs = [{"name": name, "shape": [1, SEQUENCE], "datatype": "INT64", "data": a[i % len(a)].tolist()}
                  for name, a in feeds.items()]
        out.append((json.dumps({"inputs": inputs, "parameters": {"binary_data_output": True}}).encode(),
                    {"content-type": "application/json"}))
    return out


def concurrency_runs(model: Path, name: str, requests: list[Request], args: argparse.Namespace,
                     per_row: dict[str, float]) -> dict[str, Any]:
    """Unbatched vs micro-batched servers (both up, interleaved rounds) at args.concurrency."""
    workers = str(args.workers)
    servers = {"unbatched": Server.serve(model, name, THREADS, "--workers", workers),
               "batched": Server.serve(model, name, THREADS, "--workers", workers, "--max-batch",
                                       str(args.concurrency), "--max-delay-ms", "2")}
    try:
        runs = interleaved(servers, requests, args.concurrency, args.seconds, args.rounds)
        batch_mean = histogram_mean(servers["batched"].metrics(), "compactai_batch_size")
    finally:
        for server in servers.values():
            server.stop()
    unbatched, batched = merge_rounds(runs["unbatched"]), merge_rounds(runs["batched"])
    speedups = [b["throughput_rps"] / u["throughput_rps"] for u, b in zip(runs["unbatched"], runs["batched"])]
    # the bound: when the server is CPU-bound on the cores it gets, throughput = cores / CPU per request,
    # so batching can raise throughput by at most the ratio of CPU per request (unbatched / batched)
    cpu_ratio = unbatched["server_cpu_ms_per_request"] / batched["server_cpu_ms_per_request"]
    return {"seconds": args.seconds, "rounds": args.rounds, "workers": args.workers, "threads": THREADS,
            "unbatched": unbatched, "batched": {**batched, "mean_batch_rows": batch_mean},
            "rounds_detail": runs, "speedup_by_round": speedups, "speedup": float(np.median(speedups)),
            "cpu_per_request_ratio": cpu_ratio,
            "ort_cpu_ms_per_row_batch1": per_row["1"],
            "overhead_cpu_ms_per_request": {"unbatched": unbatched["server_cpu_ms_per_request"] - per_row["1"]}}


def concurrency_rows(c: int, section: dict[str, Any]) -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for label in ("unbatched", "batched"):
        run = section[label]
        rows += [(f"c{c} {label} throughput (req/s)", run["throughput_rps"]),
                 (f"c{c} {label} p50 / p99 (ms)", f"{run['p50_ms']:.2f} / {run['p99_ms']:.2f}"),
                 (f"c{c} {label} failed", run["failed"]),
                 (f"c{c} {label} CPU cores busy, client / server",
                  f"{run['client_cpu_cores']:.2f} / {run['server_cpu_cores']:.2f}"),
                 (f"c{c} {label} server CPU per request (ms)", run["server_cpu_ms_per_request"])]
    return [*rows, ("mean rows per batch", section["batched"]["mean_batch_rows"]),
            ("throughput with / without batching (median of rounds)", section["speedup"]),
            ("bound: server CPU per request, unbatched / batched", section["cpu_per_request_ratio"])]


def print_table(console: Console, title: str, rows: list[tuple[str, Any]]) -> None:
    table = Table(title=title, title_justify="left")
    table.add_column("figure", justify="left")
    table.add_column("value", justify="right")
    for label, value in rows:
        table.add_row(label, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)


def batch1(args: argparse.Namespace, models: dict[str, Path], image: np.ndarray) -> dict[str, Any]:
    """Batch-1 p50 (ms) of a bare ONNX Runtime call and of a server request per model, client and body
    kind, plus the echo floor: all servers up at once, in interleaved rounds (medians of the rounds)."""
    requests = bodies(image, 64)
    kinds = {"json": requests[0::2], "binary": requests[1::2]}
    clients = {"http.client": sequential_p50_ms, "lean": lean_p50_ms}
    servers = {"echo": Server([sys.executable, __file__, "--echo-server"])}
    servers.update({name: Server.serve(path, "digits", THREADS) for name, path in models.items()})
    rounds: dict[str, list[float]] = {}
    per_round = max(100, args.queries // args.rounds)
    try:
        for _ in range(args.rounds):
            for name, path in models.items():
                rounds.setdefault(f"{name} bare", []).append(bare_p50_ms(path, {"image": image}, per_round))
            for name, server in servers.items():
                for client, measure in clients.items():
                    for kind, reqs in kinds.items():
                        rounds.setdefault(f"{name} {client} {kind}", []).append(measure(server, reqs, per_round))
        text = servers["digits"].metrics()
    finally:
        for server in servers.values():
            server.stop()
    p50 = {key: float(np.median(values)) for key, values in rounds.items()}
    out: dict[str, Any] = {"p50_ms": p50, "rounds": rounds}
    for name in models:
        out[f"{name}_added_p50_ms"] = {f"{client} {kind}": p50[f"{name} {client} {kind}"] - p50[f"{name} bare"]
                                       for client in clients for kind in kinds}
    out["floor_echo_p50_ms"] = {f"{client} {kind}": p50[f"echo {client} {kind}"] for client in clients for kind in kinds}
    in_server = histogram_mean(text, "compactai_request_duration_seconds")
    compute = histogram_mean(text, "compactai_compute_duration_seconds")
    out["digits_in_server_mean_ms"] = in_server and in_server * 1e3
    out["digits_compute_mean_ms"] = compute and compute * 1e3
    return out


def digits(args: argparse.Namespace, work: Path, console: Console) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    console.print("building the int8 digits model...")
    model, what = build_model(work)
    image = np.random.default_rng(1).standard_normal((1, 1, 32, 32)).astype(np.float32)
    per_row = ort_cpu_per_row_ms(model, {"image": np.repeat(image, 32, axis=0)})
    b1 = batch1(args, {"digits": model, "trivial": trivial_model(work)}, image)
    section = concurrency_runs(model, "digits", bodies(image, 64)[0::2], args, per_row)
    report: dict[str, Any] = {"model": what, "threads": THREADS, "queries": args.queries, "batch1": b1,
                              "ort_cpu_ms_per_row_by_batch": per_row, f"concurrency_{args.concurrency}": section}
    p50 = b1["p50_ms"]
    rows: list[tuple[str, Any]] = [("bare ONNX Runtime p50, digits / trivial (ms)",
                                    f"{p50['digits bare']:.3f} / {p50['trivial bare']:.3f}")]
    for client in ("lean", "http.client"):
        for label, key in (("floor: bare uvicorn echo p50", "echo"), ("digits server p50", "digits"),
                           ("trivial-model server p50", "trivial")):
            rows.append((f"{label}, {client} client, JSON / binary (ms)",
                         f"{p50[f'{key} {client} json']:.3f} / {p50[f'{key} {client} binary']:.3f}"))
        for name in ("digits", "trivial"):
            added = b1[f"{name}_added_p50_ms"]
            rows.append((f"{name}: added p50 over bare ORT, {client} client, JSON / binary (ms)",
                         f"{added[f'{client} json']:.3f} / {added[f'{client} binary']:.3f}"))
    rows += [("digits in-server mean, body read to response / compute (ms)",
              f"{b1['digits_in_server_mean_ms']:.3f} / {b1['digits_compute_mean_ms']:.3f}"),
             ("ORT CPU ms per row at batch " + ", ".join(per_row), " / ".join(f"{v:.2f}" for v in per_row.values()))]
    return report, rows + concurrency_rows(args.concurrency, section)


def minilm(args: argparse.Namespace, work: Path, console: Console) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    console.print("quantizing MiniLM to dynamic int8...")
    model, feeds = build_minilm(work)
    requests = minilm_bodies(feeds, 64)
    per_row = ort_cpu_per_row_ms(model, feeds)
    bare = bare_p50_ms(model, {name: a[:1] for name, a in feeds.items()}, args.queries // 4)
    server = Server.serve(model, "minilm", THREADS)
    try:
        server_p50 = sequential_p50_ms(server, requests, args.queries // 4)
        lean_p50 = lean_p50_ms(server, requests, args.queries // 4)
    finally:
        server.stop()
    section = concurrency_runs(model, "minilm", requests, args, per_row)
    report = {"model": f"all-MiniLM-L6-v2, dynamic int8, {SEQUENCE} tokens per request", "threads": THREADS,
              "sequence": SEQUENCE, "sentences": len(next(iter(feeds.values()))),
              "batch1": {"bare_ort_p50_ms": bare, "server_p50_ms": {"http.client": server_p50, "lean": lean_p50},
                         "added_p50_ms": {"http.client": server_p50 - bare, "lean": lean_p50 - bare}},
              "ort_cpu_ms_per_row_by_batch": per_row, f"concurrency_{args.concurrency}": section}
    rows: list[tuple[str, Any]] = [
        ("bare ONNX Runtime p50 (ms)", bare), ("server p50, JSON in / binary out, http.client / lean client (ms)", f"{server_p50:.3f} / {lean_p50:.3f}"),
        ("ORT CPU ms per row at batch " + ", ".join(per_row), " / ".join(f"{v:.2f}" for v in per_row.values()))]
    return report, rows + concurrency_rows(args.concurrency, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("digits", "minilm"), default="digits")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each throughput run (all rounds)")
    parser.add_argument("--queries", type=int, default=2000, help="batch-1 queries for the p50 figures")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved unbatched/batched rounds")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1) // THREADS),
                        help="inference threads of both servers at concurrency (default: CPUs // threads)")
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)  # the floor, run as a subprocess
    args = parser.parse_args()
    if args.echo_server:
        echo_server()
        return
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="compactai-bench-serve-"))
    console = Console()
    report, rows = (digits if args.model == "digits" else minilm)(args, work, console)
    report.update(load_summary(load_start))
    print_table(console, f"compactai serve: {report['model']}, {THREADS} intra-op thread, {args.workers} workers, "
                         f"load average {load_start[0]:.1f} at the start, {report['load_average']:.1f} at the end, "
                         f"on {report['cpus']} CPUs", rows)
    section = "server" if args.model == "digits" else "server_minilm"
    write_section(RESULTS, section, report)  # other sections (e.g. "drift") belong to other benchmarks
    console.print(f"wrote the {section!r} section of {RESULTS}")


if __name__ == "__main__":
    main()
