"""The split runner: the head runs here on ONNX Runtime, the cut tensors go to a server that holds
the tail over the KServe v2 / Open Inference Protocol REST API, and the tail's outputs come back.

This module is a client only (httpx): any server of the protocol will do, e.g. ``compactai serve
tail.onnx`` or KServe itself. Tensors travel as JSON (``name/shape/datatype/data``) or, by default,
with the protocol's binary tensor extension, so the bytes on the wire are the tensor's bytes plus a
small JSON header: what the cost model counts.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from compactai.errors import BadInputError, CompactAIError
from compactai.measure import default_threads

HEADER_LENGTH = "Inference-Header-Content-Length"
DATATYPES = {
    "BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}


class RemoteError(CompactAIError, ConnectionError):
    """The server holding the tail refused or failed the request."""


def datatype_of(array: np.ndarray) -> str:
    for name, dtype in DATATYPES.items():
        if array.dtype == np.dtype(dtype):
            return name
    raise BadInputError(f"A cut tensor has dtype {array.dtype}, which the protocol cannot carry; cut elsewhere.")


def encode_request(tensors: dict[str, np.ndarray], binary: bool = True) -> tuple[bytes, dict[str, str]]:
    """An infer request body and its headers; binary asks for binary outputs too."""
    entries, blobs = [], []
    for name, array in tensors.items():
        entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype_of(array)}
        if binary:
            blob = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = array.ravel().tolist()
        entries.append(entry)
    body: dict[str, Any] = {"inputs": entries}
    if binary:
        body["parameters"] = {"binary_data_output": True}
    header = json.dumps(body, separators=(",", ":")).encode()
    if not binary:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def decode_response(body: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """The outputs of an infer response, by name."""
    binary = b""
    if header_length is not None:
        binary, body = body[int(header_length):], body[:int(header_length)]
    outputs: dict[str, np.ndarray] = {}
    offset = 0
    for item in json.loads(body).get("outputs") or []:
        dtype = np.dtype(DATATYPES[item["datatype"]])
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            array = np.frombuffer(binary[offset:offset + size], dtype=dtype.newbyteorder("<")).astype(dtype)
            offset += size
        else:
            array = np.asarray(item["data"], dtype=dtype)
        outputs[item["name"]] = array.reshape(item["shape"])
    return outputs


class TokenBucket:
    """Paces an upload to ``rate_mbps`` megabits per second (a burst of one chunk), so a loopback
    link behaves like the stated network when the cost model is checked against a real run."""

    def __init__(self, rate_mbps: float, chunk_bytes: int = 1024) -> None:
        if not rate_mbps > 0:
            raise BadInputError(f"The token bucket rate must be positive megabits per second; got {rate_mbps}.")
        self.rate_bytes = rate_mbps * 1e6 / 8
        self.chunk_bytes = chunk_bytes

    def chunks(self, payload: bytes) -> Iterator[bytes]:
        start = time.perf_counter()
        sent = 0
        for offset in range(0, len(payload), self.chunk_bytes):
            piece = payload[offset:offset + self.chunk_bytes]
            sent += len(piece)
            # wait until the bucket holds the tokens for everything sent so far
            delay = start + sent / self.rate_bytes - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            yield piece


@dataclass
class Timing:
    head_ms: float
    remote_ms: float  # request sent, tail run, response received
    total_ms: float
    bytes_sent: int


class SplitRunner:
    """Runs a slice directory (``compactai slice -o OUT``): head here, tail at ``remote_url``.

    ``run(feeds)`` returns the model's outputs by name; ``last`` holds the timing of the last call.
    ``bandwidth_mbps`` paces the upload with a token bucket (for measuring the cost model)."""

    def __init__(self, directory: str | Path, remote_url: str | None = None, *, model_name: str | None = None,
                 binary: bool = True, bandwidth_mbps: float | None = None, timeout_s: float = 60.0,
                 threads: int | None = None, token: str | None = None) -> None:
        import onnxruntime as ort

        self.directory = Path(directory)
        manifest = self.directory / "slice.json"
        if not manifest.exists():
            raise BadInputError(f"{self.directory} has no slice.json; write one with `compactai slice MODEL -o "
                                f"{self.directory}`.")
        self.plan = json.loads(manifest.read_text())["deployment"]
        self.binary = binary
        self.bucket = TokenBucket(bandwidth_mbps) if bandwidth_mbps is not None else None
        self.head = None
        if self.plan["head"]:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            # the settings `compactai slice` timed the head with (compactai.measure's runner): intra-op
            # threads explicit, inter-op 1, so the prediction and the run time the same session
            options.intra_op_num_threads = threads or default_threads()
            options.inter_op_num_threads = 1
            self.head = ort.InferenceSession(str(self.directory / self.plan["head"]), options,
                                             providers=["CPUExecutionProvider"])
        self.client: httpx.Client | None = None
        if self.plan["tail"]:
            if not remote_url:
                raise BadInputError("This slice runs its tail remotely; give --remote URL of the server holding "
                                    f"{self.plan['tail']} (e.g. `compactai serve {self.plan['tail']}`).")
            name = model_name or self.plan["tail_model_name"]
            self.url = f"{remote_url.rstrip('/')}/v2/models/{name}/infer"
            headers = {"authorization": f"Bearer {token}"} if token else {}
            # TCP_NODELAY: the paced upload goes out in small writes, which Nagle would hold back
            # until the server's delayed ACK (tens of ms per request)
            transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
            self.client = httpx.Client(timeout=timeout_s, headers=headers, transport=transport)
        self.last: Timing | None = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The unsplit model's outputs for ``feeds``, computed head here, tail remotely."""
        start = time.perf_counter()
        sent: dict[str, np.ndarray] = {k: v for k, v in feeds.items() if k in self.plan["inputs"]}
        if self.head is not None:
            wanted = {i.name for i in self.head.get_inputs()}
            names = [o.name for o in self.head.get_outputs()]
            sent = dict(zip(names, self.head.run(names, {k: v for k, v in feeds.items() if k in wanted})))
        head_done = time.perf_counter()
        if self.client is None:
            self.last = Timing((head_done - start) * 1e3, 0.0, (head_done - start) * 1e3, 0)
            return sent
        body, headers = encode_request(sent, self.binary)
        content: Any = body if self.bucket is None else self.bucket.chunks(body)
        headers["content-length"] = str(len(body))
        try:
            response = self.client.post(self.url, content=content, headers=headers)
        except httpx.HTTPError as exc:
            raise RemoteError(f"Cannot reach the tail server at {self.url}: {exc}. Start it with "
                              f"`compactai serve {self.plan['tail']}` or fix --remote.") from exc
        if response.status_code != 200:
            raise RemoteError(f"The tail server answered {response.status_code} at {self.url}: "
                              f"{response.text[:300]}")
        outputs = decode_response(response.content, response.headers.get(HEADER_LENGTH))
        end = time.perf_counter()
        self.last = Timing((head_done - start) * 1e3, (end - head_done) * 1e3, (end - start) * 1e3, len(body))
        return outputs

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def __enter__(self) -> SplitRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


OVERHEAD_INPUT = "x"


def overhead_model() -> bytes:
    """A one-element Identity ONNX model: served next to nothing else, its ``/infer`` time is the
    per-request cost of the server and the protocol (the cost model's ``server_overhead_ms``)."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info(OVERHEAD_INPUT, TensorProto.FLOAT, [1, 1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1])
    graph = helper.make_graph([helper.make_node("Identity", [OVERHEAD_INPUT], ["y"])], "overhead", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


class OverheadProbe:
    """Times ``/infer`` requests for the one-element model of ``overhead_model()`` served as
    ``model_name`` at ``url``, on one kept-alive connection, with the split runner's client code."""

    def __init__(self, url: str, model_name: str, token: str | None = None) -> None:
        self.body, self.headers = encode_request({OVERHEAD_INPUT: np.ones((1, 1), np.float32)})
        self.url = f"{url.rstrip('/')}/v2/models/{model_name}/infer"
        auth = {"authorization": f"Bearer {token}"} if token else {}
        transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self.client = httpx.Client(timeout=30.0, headers=auth, transport=transport)

    def once(self) -> float:
        """One request's round trip, ms."""
        start = time.perf_counter()
        response = self.client.post(self.url, content=self.body, headers=self.headers)
        if response.status_code != 200:
            raise RemoteError(f"The server answered {response.status_code} at {self.url} for the overhead model: "
                              f"{response.text[:300]}")
        decode_response(response.content, response.headers.get(HEADER_LENGTH))
        return (time.perf_counter() - start) * 1e3

    def close(self) -> None:
        self.client.close()


def measure_request_overhead(url: str, model_name: str, queries: int = 30, token: str | None = None,
                             warmup: int = 5) -> list[float]:
    """Round-trip times (ms) of ``queries`` ``/infer`` requests of the overhead model (after ``warmup``)."""
    probe = OverheadProbe(url, model_name, token)
    try:
        for _ in range(warmup):
            probe.once()
        return [probe.once() for _ in range(queries)]
    finally:
        probe.close()
