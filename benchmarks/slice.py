"""Model slicing (issue 19): the cost model against a measured run, for every cut of the digits CNN.

For each cut, the tail runs in a real `compactai serve` process on 127.0.0.1 and the split runner
sends the cut tensors with its upload paced by a token bucket at the stated bandwidth; the measured
end-to-end latency (median of the timed queries) is compared with the cost model's prediction from
`compactai slice`'s measured parts: head_ms + bytes*8/bandwidth + RTT + tail_ms. The RTT is the
loopback HTTP round trip measured on the same client (GET /v2/health/ready) next to every
query, so load from other processes hits both alike.

    flock /tmp/compactai-bench.lock .venv/bin/python benchmarks/slice.py [--bandwidth-mbps 10]
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

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table

from compactai import load_example
from compactai.measure import environment
from compactai.techniques.slice.placement import SliceConfig, end_to_end_ms, profile_cuts
from compactai.techniques.slice.runner import SplitRunner

RESULTS = Path(__file__).parent / "results" / "slice.json"
console = Console(width=160)


def start_server(tail: Path, serve_from: str | None) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ)
    if serve_from:
        env["PYTHONPATH"] = serve_from
    process = subprocess.Popen([sys.executable, "-m", "compactai.cli", "serve", str(tail), "--port", "0",
                                "--name", "tail", "--json"], stdout=subprocess.PIPE, text=True, env=env,
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bandwidth-mbps", type=float, default=2.0)
    parser.add_argument("--model", type=Path, default=None, help="an .onnx file instead of the digits CNN")
    parser.add_argument("--serve-from", default=None)
    parser.add_argument("--queries", type=int, default=30)
    args = parser.parse_args()
    if args.serve_from is None and importlib.util.find_spec("compactai.cli.serve") is None:
        raise SystemExit("this checkout has no `compactai serve`; pass --serve-from CHECKOUT")
    work = Path(tempfile.mkdtemp(prefix="compactai-bench-slice-"))
    if args.model is None:
        example = load_example("digits")
        model = Path(example.handle.to_onnx(work / "digits.onnx").path)
        split = example.task.splits[example.task.eval_split]
        samples = {k: v[:64] for k, v in split.inputs.items()}
        name = "digits-resnet"
    else:
        model, name = args.model, args.model.stem
        from compactai.models.load import load_onnx

        samples = load_onnx(model).example_inputs
    config = SliceConfig(max_cuts=1000, compressions=("raw",), rounds=3)
    console.print(f"profiling every cut of {name} ...")
    profiles = profile_cuts(model, samples, config, work / "cuts", progress=lambda m: console.print(f"  {m}"))
    feeds = {k: v[:1] for k, v in samples.items()}
    rows = []
    for index, profile in enumerate(profiles):
        directory = work / f"run{index:02d}"
        directory.mkdir()
        write_deployment(directory, profile)
        _head, tail = profile.parts["raw"]
        server = None
        try:
            rtt = 0.0
            url = None
            if tail.path is not None:
                server, url = start_server(tail.path, args.serve_from)
            samples_ms, rtt_samples, body_bytes = [], [], 0
            probe = httpx.Client() if url else None
            with SplitRunner(directory, url, bandwidth_mbps=args.bandwidth_mbps) as runner:
                for _ in range(5):
                    runner.run(feeds)
                for _ in range(args.queries):
                    if probe is not None:  # the loopback round trip, sampled next to every query (same load)
                        start = time.perf_counter()
                        probe.get(f"{url}/v2/health/ready")
                        rtt_samples.append((time.perf_counter() - start) * 1e3)
                    runner.run(feeds)
                    assert runner.last is not None
                    samples_ms.append(runner.last.total_ms)
                    body_bytes = runner.last.bytes_sent
            if probe is not None:
                probe.close()
                rtt = statistics.median(rtt_samples)
            predicted = end_to_end_ms(profile, "raw", args.bandwidth_mbps, rtt or 1e-9, 1.0)
            measured = statistics.median(samples_ms)
            error = (measured - predicted["end_to_end_ms"]) / predicted["end_to_end_ms"]
            rows.append({"cut": profile.cut.label, "kind": profile.cut.kind, "tensor_bytes": profile.tensor_bytes["raw"],
                         "body_bytes": body_bytes, "rtt_ms": rtt, **{f"predicted_{k}": v for k, v in predicted.items()},
                         "measured_ms": measured, "measured_p90_ms": float(np.percentile(samples_ms, 90)),
                         "relative_error": error})
            console.print(f"  {profile.cut.label[:50]}: predicted {predicted['end_to_end_ms']:.2f} ms, "
                          f"measured {measured:.2f} ms ({error:+.1%})")
        finally:
            if server is not None:
                server.terminate()
                server.wait(timeout=30)
    table = Table(title=f"{name}: predicted vs measured end-to-end at {args.bandwidth_mbps:g} Mbit/s (loopback, "
                        "token-bucket sender)")
    for column in ("cut", "KB sent", "head ms", "transfer ms", "RTT ms", "tail ms", "predicted ms", "measured ms",
                   "error"):
        table.add_column(column, justify="left" if column == "cut" else "right")
    for row in rows:
        table.add_row(row["cut"][:48], f"{row['tensor_bytes'] / 1024:.1f}", f"{row['predicted_head_ms']:.2f}",
                      f"{row['predicted_transfer_ms'] - row['rtt_ms']:.2f}", f"{row['rtt_ms']:.2f}",
                      f"{row['predicted_tail_ms']:.2f}", f"{row['predicted_end_to_end_ms']:.2f}",
                      f"{row['measured_ms']:.2f}", f"{row['relative_error']:+.1%}")
    console.print(table)
    within = sum(abs(r["relative_error"]) <= 0.15 for r in rows)
    console.print(f"{within}/{len(rows)} cuts within 15% of the prediction; load average "
                  f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"model": name, "bandwidth_mbps": args.bandwidth_mbps, "queries": args.queries,
                                   "rows": rows, "within_15_percent": within, "cuts": len(rows),
                                   "load_average": os.getloadavg(), "environment": environment()}, indent=2,
                                  default=str))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
