"""A minimal KServe v2 / Open Inference Protocol server (stdlib HTTP + ONNX Runtime) on 127.0.0.1,
for testing the split runner without the runtime server: POST /v2/models/{name}/infer with JSON
tensors or the binary tensor extension."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compactai.techniques.slice.runner import DATATYPES, HEADER_LENGTH, datatype_of


@contextmanager
def kserve_stub(model: Path, name: str) -> Iterator[str]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            if self.path != f"/v2/models/{name}/infer":
                self.send_error(404)
                return
            body = self.rfile.read(int(self.headers["content-length"]))
            header_length = self.headers.get(HEADER_LENGTH)
            binary = b""
            if header_length is not None:
                binary, body = body[int(header_length):], body[:int(header_length)]
            request = json.loads(body)
            feeds, offset = {}, 0
            for item in request["inputs"]:
                dtype = np.dtype(DATATYPES[item["datatype"]])
                size = (item.get("parameters") or {}).get("binary_data_size")
                if size is None:
                    array = np.asarray(item["data"], dtype=dtype)
                else:
                    array = np.frombuffer(binary[offset:offset + size], dtype=dtype)
                    offset += size
                feeds[item["name"]] = array.reshape(item["shape"])
            names = [o.name for o in session.get_outputs()]
            outputs = dict(zip(names, session.run(names, feeds)))
            reply = {"model_name": name, "outputs": [
                {"name": n, "shape": list(a.shape), "datatype": datatype_of(a), "data": a.ravel().tolist()}
                for n, a in outputs.items()]}
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
