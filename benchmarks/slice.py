"""Model slicing (issue 19): the cost model against a measured run, for every cut of the digits CNN.

For each cut, the tail runs in a real `compactai serve` process on 127.0.0.1 and the split runner
sends the cut tensors with its upload paced by a token bucket at the stated bandwidth; the measured
end-to-end latency (median of the timed queries) is compared with the cost model's prediction:

    head_ms + request_bytes*8/bandwidth + RTT + server_overhead_ms + tail_ms

``server_overhead_ms`` is measured with a real ``/infer`` of a one-element model
(``runner.overhead_model()``) against its own `compactai serve` process, by the split runner's
client code; on loopback that round trip also holds the RTT, so the RTT term is 0 here. Every
split query is preceded by one timed head run, one timed tail run (the runners `compactai slice`
times them with, 1 intra-op thread) and one overhead request, so the parts are timed under the
same load and duty cycle as the run they predict: on a loaded machine a head timed back to back
took 5x as long as the same head inside the run, which sleeps on the network between heads
(docs/slicing.md).

    flock /tmp/compactai-bench.lock nice -n -10 .venv/bin/python benchmarks/slice.py [--bandwidth-mbps 10]
        [--model PATH] [--serve-from CHECKOUT]

``--serve-from`` runs `compactai serve` from another checkout (its directory goes on PYTHONPATH of
the server process) when this one does not have it. Prints a table, writes benchmarks/results/slice.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from compactai import load_example
from compactai.measure import environment, make_runner
from compactai.models.load import load_onnx
from compactai.techniques.slice.placement import SliceConfig, end_to_end_ms, profile_cuts
from compactai.techniques.slice.runner import OverheadProbe, SplitRunner, overhead_model

RESULTS = Path(__file__).parent / "results" / "slice.json"
# ONNX Runtime intra-op threads for every head and tail, here and in the servers: on the 2-CPU
# machine shared with other work, 2 threads made the digits CNN twice as slow as 1 thread and far
# noisier (p50 29-37 ms vs 12-16 ms in interleaved rounds at load average 13), so the profile and
# the run drifted apart; the cost model is about composing the parts, which 1 thread shows cleanly
THREADS = 1
console = Console(width=160)


def start_server(tail: Path, serve_from: str | None, name: str = "tail") -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ)
    if serve_from:
        env["PYTHONPATH"] = serve_from
    process = subprocess.Popen([sys.executable, "-m", "compactai.cli", "serve", str(tail), "--port", "0",
                                "--name", name, "--threads", str(THREADS), "--json"], stdout=subprocess.PIPE, text=True, env=env,
                               cwd=serve_from or None)  # python -m puts the cwd first on sys.path
    line = process.stdout.readline()  # type: ignore[union-attr]
    if not line:
        process.kill()
        raise SystemExit("compactai serve did not start; pass --serve-from a checkout that has it")
    # drain the server's log lines so a full pipe never blocks it
    threading.Thread(target=process.stdout.read, daemon=True).start()  # type: ignore[union-attr]
    return process, f"http://127.0.0.1:{json.loads(line)['port']}"


def write_deployment(directory: Path, profile: Any) -> None:
    head, tail = profile.parts["raw"]
    deployment = {"head": str(head.path) if head.path else None, "tail": str(tail.path) if tail.path else None,
                  "tail_model_name": "tail", "inputs": head.inputs, "sent": head.outputs, "outputs": tail.outputs,
                  "compression": "raw", "cut": profile.cut.to_dict()}
    (directory / "slice.json").write_text(json.dumps({"deployment": deployment}))


def part_runner(path: Path | None, feeds: dict[str, np.ndarray]) -> tuple[Any, dict[str, np.ndarray]] | None:
    """A measurement runner for one head or tail (as `compactai slice` times them), with its feeds."""
    if path is None:
        return None
    handle = load_onnx(path)
    handle.example_inputs = {k: v for k, v in feeds.items() if k in handle.input_names}
    return make_runner(handle, "onnxruntime", THREADS), handle.example_inputs


def measure_cut(profile: Any, directory: Path, url: str | None, overhead_url: str, feeds: dict[str, np.ndarray],
                args: argparse.Namespace) -> dict[str, Any]:
    """Each split query is preceded by one timed run of the head and of the tail (the measurement
    runners `compactai slice` uses) and one overhead request, so the parts are timed under the
    same load and the same duty cycle as the run they predict; the medians go into the cost model."""
    head_part, tail_part = profile.parts["raw"]
    head = part_runner(head_part.path, feeds)
    middle = dict(zip(head_part.outputs, head[0].run(head[1]))) if head else feeds
    tail = part_runner(tail_part.path, middle)
    probe = OverheadProbe(overhead_url, "overhead") if url else None

    def timed(run: Any) -> float:
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) * 1e3

    head_ms: list[float] = []
    tail_ms: list[float] = []
    overhead_ms: list[float] = []
    measured: list[float] = []
    head_in_run: list[float] = []
    try:
        with SplitRunner(directory, url, bandwidth_mbps=args.bandwidth_mbps, threads=THREADS) as runner:
            for query in range(3 + args.queries):  # the first 3 warm everything up
                parts = (timed(lambda: head[0].run(head[1])) if head else 0.0,
                         timed(lambda: tail[0].run(tail[1])) if tail else 0.0,
                         probe.once() if probe else 0.0)
                runner.run(feeds)
                assert runner.last is not None
                if query >= 3:
                    for values, value in zip((head_ms, tail_ms, overhead_ms), parts):
                        values.append(value)
                    measured.append(runner.last.total_ms)
                    head_in_run.append(runner.last.head_ms)
    finally:
        if probe is not None:
            probe.close()
    profile.head_ms["raw"], profile.tail_ms["raw"] = statistics.median(head_ms), statistics.median(tail_ms)
    predicted = end_to_end_ms(profile, "raw", args.bandwidth_mbps, 0.0, 1.0, None, statistics.median(overhead_ms))
    result = statistics.median(measured)
    return {"cut": profile.cut.label, "kind": profile.cut.kind, "tensor_bytes": profile.tensor_bytes["raw"],
            "request_bytes": profile.request_bytes.get("raw", 0), "head_ms_in_run": statistics.median(head_in_run),
            **{f"predicted_{k}": v for k, v in predicted.items()}, "measured_ms": result,
            "measured_p90_ms": float(np.percentile(measured, 90)),
            "relative_error": (result - predicted["end_to_end_ms"]) / predicted["end_to_end_ms"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bandwidth-mbps", type=float, default=10.0)
    parser.add_argument("--model", type=Path, default=None, help="an .onnx file instead of the digits CNN")
    parser.add_argument("--serve-from", default=None)
    parser.add_argument("--queries", type=int, default=25, help="timed split queries per cut")
    args = parser.parse_args()
    if args.serve_from is None and importlib.util.find_spec("compactai.cli.serve") is None:
        raise SystemExit("this checkout has no `compactai serve`; pass --serve-from CHECKOUT")
    work = Path(tempfile.mkdtemp(prefix="compactai-bench-slice-"))
    load_start = os.getloadavg()
    if args.model is None:
        example = load_example("digits")
        model = Path(example.handle.to_onnx(work / "digits.onnx").path)
        split = example.task.splits[example.task.eval_split]
        samples = {k: v[:64] for k, v in split.inputs.items()}
        name = example.handle.name
    else:
        model, name = args.model, args.model.stem
        samples = load_onnx(model).example_inputs
    config = SliceConfig(max_cuts=1000, compressions=("raw",), rounds=1, threads=THREADS)
    console.print(f"profiling every cut of {name} ...")
    profiles = profile_cuts(model, samples, config, work / "cuts", progress=lambda m: console.print(f"  {m}"))
    feeds = {k: v[:1] for k, v in samples.items()}
    (work / "overhead.onnx").write_bytes(overhead_model())
    overhead_server, overhead_url = start_server(work / "overhead.onnx", args.serve_from, "overhead")
    rows = []
    try:
        for index, profile in enumerate(profiles):
            directory = work / f"run{index:02d}"
            directory.mkdir()
            write_deployment(directory, profile)
            tail = profile.parts["raw"][1]
            server, url = start_server(tail.path, args.serve_from) if tail.path is not None else (None, None)
            try:
                row = measure_cut(profile, directory, url, overhead_url, feeds, args)
            finally:
                if server is not None:
                    server.terminate()
                    server.wait(timeout=30)
            rows.append(row)
            console.print(f"  {profile.cut.label[:50]}: predicted {row['predicted_end_to_end_ms']:.2f} ms, "
                          f"measured {row['measured_ms']:.2f} ms ({row['relative_error']:+.1%})")
    finally:
        overhead_server.terminate()
        overhead_server.wait(timeout=30)
    table = Table(title=f"{name}: predicted vs measured end-to-end at {args.bandwidth_mbps:g} Mbit/s (loopback, "
                        "token-bucket sender)")
    for column in ("cut", "KB sent", "head ms", "head ms in run", "transfer ms", "overhead ms", "tail ms",
                   "predicted ms", "measured ms", "error"):
        table.add_column(column, justify="left" if column == "cut" else "right")
    for row in rows:
        table.add_row(row["cut"][:48], f"{row['request_bytes'] / 1024:.1f}", f"{row['predicted_head_ms']:.2f}",
                      f"{row['head_ms_in_run']:.2f}",
                      f"{row['predicted_transfer_ms']:.2f}", f"{row['predicted_overhead_ms']:.2f}",
                      f"{row['predicted_tail_ms']:.2f}", f"{row['predicted_end_to_end_ms']:.2f}",
                      f"{row['measured_ms']:.2f}", f"{row['relative_error']:+.1%}")
    console.print(table)
    within = sum(abs(r["relative_error"]) <= 0.15 for r in rows)
    errors = [r["relative_error"] for r in rows]
    console.print(f"{within}/{len(rows)} cuts within 15% of the prediction (errors {min(errors):+.1%} .. "
                  f"{max(errors):+.1%}, median {statistics.median(errors):+.1%}); load average {load_start[0]:.1f} "
                  f"at the start, {os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"model": name, "bandwidth_mbps": args.bandwidth_mbps, "queries": args.queries,
                                   "rows": rows, "within_15_percent": within,
                                   "cuts": len(rows), "load_average_start": load_start,
                                   "load_average": os.getloadavg(), "environment": environment()}, indent=2,
                                  default=str))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
