"""The wire format on its own: every datatype through JSON and the binary extension, and malformed bodies."""

from __future__ import annotations

import json

import numpy as np
import pytest

from compactai.runtime.server.protocol import (
    DATATYPES,
    RequestError,
    TensorMeta,
    check_inputs,
    decode_response,
    encode_response,
    parse_infer_request,
)

SAMPLES = {
    "BOOL": np.array([[True, False, True]]), "UINT8": np.array([[0, 7, 255]], np.uint8),
    "UINT16": np.array([[0, 7, 65535]], np.uint16), "UINT32": np.array([[1, 2, 3]], np.uint32),
    "UINT64": np.array([[1, 2, 3]], np.uint64), "INT8": np.array([[-128, 0, 127]], np.int8),
    "INT16": np.array([[-3, 0, 3]], np.int16), "INT32": np.array([[-3, 0, 3]], np.int32),
    "INT64": np.array([[-3, 0, 2**40]], np.int64), "FP16": np.array([[0.5, -1.0, 2.0]], np.float16),
    "FP32": np.array([[0.25, -1.5, 3.0]], np.float32), "FP64": np.array([[1e-300, -2.0, 3.5]], np.float64),
    "BYTES": np.array([["a", "hé", ""]], dtype=object),
}


@pytest.mark.parametrize("datatype", list(DATATYPES))
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_every_datatype_round_trips(datatype: str, binary: bool) -> None:
    array = SAMPLES[datatype]
    request = parse_infer_request(json.dumps({"inputs": [{"name": "t", "shape": [1, 3], "datatype": datatype,
                                                          "data": array.tolist()}]}).encode(), None)
    parsed = request.inputs["t"]
    assert parsed.dtype == DATATYPES[datatype] and parsed.shape == (1, 3)
    assert parsed.tolist() == array.tolist()
    request.binary_all = binary
    body, headers = encode_response(request, {"t": parsed}, model_name="m", model_version="1", parameters={})
    meta, outputs = decode_response(body, headers.get("inference-header-content-length"))
    assert meta["outputs"][0]["datatype"] == datatype
    assert ("binary_data_size" in meta["outputs"][0].get("parameters", {})) is binary
    assert outputs["t"].dtype == DATATYPES[datatype] and outputs["t"].tolist() == array.tolist()


@pytest.mark.parametrize(("body", "says"), [
    (b"", "not valid JSON"), (b"null", "JSON object"), (b'{"inputs": {}}', "non-empty list"),
    (b'{"inputs": [1]}', "JSON object"), (b'{"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}]}', "name"),
    (b'{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}', "non-negative"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}', "neither"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [[1, 2], [3]]}]}', "FP32"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "INT8", "data": [1000]}]}', "INT8"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}]}', "BYTES"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]},'
     b' {"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', "twice"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], "outputs": 3}', "outputs"),
])
def test_malformed_requests_are_400_with_a_message(body: bytes, says: str) -> None:
    with pytest.raises(RequestError) as error:
        parse_infer_request(body, None)
    assert error.value.status == 400 and says in str(error.value)


def test_binary_sizes_must_add_up() -> None:
    header = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    ok = parse_infer_request(header + np.array([1, 2], "<f4").tobytes(), str(len(header)))
    assert ok.inputs["x"].tolist() == [1.0, 2.0]
    for tail, says in ((b"\0" * 4, "beyond"), (b"\0" * 12, "add up")):
        with pytest.raises(RequestError, match=says):
            parse_infer_request(header + tail, str(len(header)))
    wrong = json.dumps({"inputs": [{"name": "x", "shape": [3], "datatype": "FP32",
                                    "parameters": {"binary_data_size": 8}}]}).encode()
    with pytest.raises(RequestError, match="need"):
        parse_infer_request(wrong + b"\0" * 8, str(len(wrong)))


def test_signature_checks_name_the_fix() -> None:
    specs = [TensorMeta("x", "FP32", (-1, 4))]
    request = parse_infer_request(b'{"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", '
                                  b'"data": [0, 0, 0, 0, 0, 0, 0, 0]}]}', None)
    check_inputs(request, specs, "m")  # dynamic first axis: any batch
    request.inputs["x"] = request.inputs["x"].reshape(4, 2)
    with pytest.raises(RequestError, match=r"expects \[-1, 4\]"):
        check_inputs(request, specs, "m")
