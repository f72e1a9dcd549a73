"""A load generator for the server: a thread pool of httpx clients at fixed concurrency and duration.

Run it as its own process so it does not share the server's interpreter::

    python -m compactai.runtime.server.loadgen --url http://127.0.0.1:8000 --model digits \\
        --input image --shape 1,1,32,32 --concurrency 32 --seconds 10 --out load.json

Each request sends random FP32 data (seeded per worker); the JSON written holds one record per
request (start time, latency, HTTP status, model version, error) and the summary figures. On
stdout it prints ``{"started": unix time}`` once the first answer is back, then the summary.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) of ``values``, or None when there are none."""
    return float(np.percentile(values, q)) if values else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Request count, failures, p50/p99 latency (ms) and throughput of a list of records."""
    ok = [r for r in records if r["status"] == 200]
    latencies = [r["latency_ms"] for r in ok]
    span = (max(r["start"] + r["latency_ms"] / 1e3 for r in records) - min(r["start"] for r in records)
            if records else 0.0)
    return {"requests": len(records), "failed": len(records) - len(ok),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "mean_ms": statistics.fmean(latencies) if latencies else None,
            "throughput_rps": len(ok) / span if span > 0 else None,
            "versions": sorted({str(r.get("version")) for r in ok})}


def run_load(url: str, model: str, input_name: str, shape: list[int], *, concurrency: int, seconds: float,
             max_requests: int | None = None, token: str | None = None, record_data: bool = False,
             timeout: float = 30.0, seed: int = 0, binary: bool = False,
             on_first: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Drive ``url`` from ``concurrency`` threads for ``seconds`` (or ``max_requests`` in all);
    ``on_first`` is called once, when the first answer is back (the load is then running)."""
    import httpx

    endpoint = f"{url.rstrip('/')}/v2/models/{model}/infer"
    headers = {"authorization": f"Bearer {token}"} if token else {}
    deadline = time.perf_counter() + seconds
    records: list[dict[str, Any]] = []
    lock = threading.Lock()
    budget = [max_requests if max_requests is not None else 1 << 62]

    def worker(index: int) -> None:
        rng = np.random.default_rng(seed + index)
        # TCP_NODELAY, as a real client should: Nagle would add the server's delayed ACK to each request
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        with httpx.Client(timeout=timeout, headers=headers, transport=transport) as client:
            while time.perf_counter() < deadline:
                with lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                data = rng.standard_normal(shape).astype(np.float32)
                record: dict[str, Any] = {"start": time.time()}
                began = time.perf_counter()
                try:
                    response = _post(client, endpoint, input_name, data, binary)
                    record["latency_ms"] = (time.perf_counter() - began) * 1e3
                    record["status"] = response.status_code
                    body = _json_part(response)
                    record["version"] = body.get("model_version")
                    record["served_by"] = (body.get("parameters") or {}).get("served_by")
                    if response.status_code != 200:
                        record["error"] = body.get("error")
                    elif record_data:
                        record["input"] = data.ravel().tolist()
                        record["output"] = body["outputs"][0].get("data")
                except Exception as exc:  # noqa: BLE001 (a transport failure is a failed request, recorded)
                    record.update(latency_ms=(time.perf_counter() - began) * 1e3, status=0,
                                  error=f"{type(exc).__name__}: {exc}")
                with lock:
                    records.append(record)
                    first = len(records) == 1
                if first and on_first is not None:
                    on_first()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(records, key=lambda r: r["start"])


def _post(client: Any, endpoint: str, input_name: str, data: np.ndarray, binary: bool) -> Any:
    tensor: dict[str, Any] = {"name": input_name, "shape": list(data.shape), "datatype": "FP32"}
    if not binary:
        tensor["data"] = data.ravel().tolist()
        return client.post(endpoint, content=json.dumps({"inputs": [tensor]}),
                           headers={"content-type": "application/json"})
    raw = data.astype("<f4").tobytes()
    tensor["parameters"] = {"binary_data_size": len(raw)}
    header = json.dumps({"inputs": [tensor]}).encode()
    return client.post(endpoint, content=header + raw, headers={"inference-header-content-length": str(len(header)),
                                                                "content-type": "application/octet-stream"})


def _json_part(response: Any) -> dict[str, Any]:
    length = response.headers.get("inference-header-content-length")
    raw = response.content[:int(length)] if length else response.content
    try:
        body = json.loads(raw)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True, help="input tensor name")
    parser.add_argument("--shape", required=True, help="comma-separated shape, e.g. 1,4")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--token", default=None)
    parser.add_argument("--record-data", action="store_true", help="keep each request's input and first output")
    parser.add_argument("--binary", action="store_true", help="send inputs with the binary tensor extension")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    records = run_load(args.url, args.model, args.input, [int(d) for d in args.shape.split(",")],
                       concurrency=args.concurrency, seconds=args.seconds, max_requests=args.max_requests,
                       token=args.token, record_data=args.record_data, seed=args.seed, binary=args.binary,
                       on_first=lambda: print(json.dumps({"started": time.time()}), flush=True))
    summary = summarize(records)
    args.out.write_text(json.dumps({"summary": summary, "records": records}))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
