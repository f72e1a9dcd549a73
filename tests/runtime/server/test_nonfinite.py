"""A model output of NaN or Inf: JSON cannot carry it, so a JSON answer is a 500 that says so (and is
counted); the binary tensor extension carries the raw IEEE values; the server keeps serving."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np

from compactai.runtime.server.protocol import HEADER_LENGTH
from tests.runtime.conftest import tiny_model
from tests.runtime.server.conftest import infer_body


def test_nan_output_is_a_500_in_json_and_raw_ieee_in_binary(serve, tmp_path: Path) -> None:
    running = serve(tiny_model(tmp_path / "log.onnx", op="Log"))  # y = log(x): NaN for x < 0
    with httpx.Client(base_url=running.url, timeout=30) as client:
        bad = client.post("/v2/models/log/infer", json=infer_body([[-1.0, 1.0, 2.0, 3.0]]))
        assert bad.status_code == 500
        # the body is valid JSON (no `NaN` token) and names the output and the way out
        error = json.loads(bad.text)["error"]
        assert "NaN or Inf" in error and "'y'" in error and "binary_data_output" in error

        binary = client.post("/v2/models/log/infer",
                             json=infer_body([[-1.0, 0.0, 1.0, 1.0]], parameters={"binary_data_output": True}))
        assert binary.status_code == 200
        length = int(binary.headers[HEADER_LENGTH])
        header = json.loads(binary.content[:length])
        values = np.frombuffer(binary.content[length:], dtype="<f4")
        assert header["outputs"][0]["parameters"]["binary_data_size"] == 16
        assert np.isnan(values[0]) and np.isneginf(values[1]) and values[2] == 0.0

        fine = client.post("/v2/models/log/infer", json=infer_body([[1.0, 1.0, 1.0, 1.0]]))
        assert fine.status_code == 200 and fine.json()["outputs"][0]["data"] == [0.0] * 4
        metrics = client.get("/metrics").text
    assert 'compactai_requests_total{model="log",outcome="nonfinite_output",version="1"} 1.0' in metrics
    assert 'compactai_requests_total{model="log",outcome="ok",version="1"} 2.0' in metrics
