"""The KServe v2 / Open Inference Protocol on the wire: request parsing, validation, responses.

An inference request is a JSON object ``{"id", "parameters", "inputs": [{"name", "shape",
"datatype", "data"}], "outputs": [{"name", "parameters"}]}`` with row-major tensor data. With the
binary tensor extension the body is that JSON header (its length in the
``Inference-Header-Content-Length`` HTTP header) followed by raw little-endian tensor bytes,
one input after the other, each announced by ``parameters.binary_data_size``.

Every mistake of the client raises :class:`RequestError` with a 4xx status and one line for people.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

HEADER_LENGTH = "Inference-Header-Content-Length"
# protocol datatype -> numpy dtype (BYTES is a numpy object array of str/bytes, as ONNX Runtime wants)
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_), "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64), "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16), "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}
# ONNX Runtime's type strings -> protocol datatype
ORT_TYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


class RequestError(Exception):
    """A request that cannot be answered: ``status`` is the HTTP status (400, 401, 404, 413 for client
    mistakes; 500 for a model output that JSON cannot carry), the message says what to fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TensorMeta:
    """Name, protocol datatype and shape (-1 for a dynamic axis) of one model input or output."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class InferRequest:
    """A parsed request: inputs as numpy arrays by name, the outputs asked for and in which form."""

    inputs: dict[str, np.ndarray]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None  # None: every output
    binary_outputs: set[str] = field(default_factory=set)
    binary_all: bool = False  # request parameter binary_data_output

    def wants_binary(self, name: str) -> bool:
        return self.binary_all or name in self.binary_outputs


def tensor_meta(node: Any) -> TensorMeta:
    """TensorMeta of an ONNX Runtime NodeArg (named or symbolic axes become -1)."""
    datatype = ORT_TYPES.get(node.type)
    if datatype is None:
        raise RequestError(400, f"Tensor {node.name!r} has type {node.type}, which the protocol cannot carry.")
    return TensorMeta(node.name, datatype, tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape))


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(400, f"{what} must be a JSON object.")
    return value


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """Parse a JSON (or binary-extension) request body; raises RequestError(400) on any malformation."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise RequestError(400, f"{HEADER_LENGTH} is {header_length!r}, not a length within the "
                                    f"{len(body)}-byte body.")
        binary, body = body[int(header_length):], body[:int(header_length)]
    try:
        raw = orjson.loads(body)  # about 10x faster than json.loads on a 32x32 image of floats
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"The request body is not valid JSON ({exc}).") from exc
    raw = _object(raw, "The request body")
    inputs = raw.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, "The request needs 'inputs': a non-empty list of {name, shape, datatype, data}.")
    parameters = _object(raw.get("parameters") or {}, "'parameters'")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for item in inputs:
        item = _object(item, "Each entry of 'inputs'")
        array, used = _parse_tensor(item, binary, offset)
        offset += used
        if item["name"] in arrays:
            raise RequestError(400, f"Input {item['name']!r} is given twice.")
        arrays[item["name"]] = array
    if offset != len(binary):
        raise RequestError(400, f"The binary part of the body has {len(binary)} bytes but the inputs' "
                                f"binary_data_size add up to {offset}.")
    request = InferRequest(arrays, id=None if raw.get("id") is None else str(raw["id"]), parameters=parameters)
    request.binary_all = bool(parameters.get("binary_data_output", False))
    if raw.get("outputs") is not None:
        if not isinstance(raw["outputs"], list):
            raise RequestError(400, "'outputs' must be a list of {name, parameters}.")
        request.outputs = []
        for out in raw["outputs"]:
            out = _object(out, "Each entry of 'outputs'")
            if not isinstance(out.get("name"), str):
                raise RequestError(400, "Each entry of 'outputs' needs a 'name'.")
            request.outputs.append(out["name"])
            if _object(out.get("parameters") or {}, "'outputs[].parameters'").get("binary_data"):
                request.binary_outputs.add(out["name"])
    return request


def _parse_tensor(item: dict[str, Any], binary: bytes, offset: int) -> tuple[np.ndarray, int]:
    """One request input as a numpy array, and how many bytes of the binary part it used."""
    name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
    if not isinstance(name, str):
        raise RequestError(400, "Each input needs a string 'name'.")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise RequestError(400, f"Input {name!r} needs 'shape': a list of non-negative integers. Got {shape!r}.")
    if datatype not in DATATYPES:
        raise RequestError(400, f"Input {name!r} has datatype {datatype!r}; use one of {', '.join(DATATYPES)}.")
    dtype = DATATYPES[datatype]
    count = math.prod(shape)  # math.prod: np.prod costs ~20x more on a short list, on every request
    size = _object(item.get("parameters") or {}, f"'parameters' of input {name!r}").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise RequestError(400, f"Input {name!r} announces binary_data_size {size!r}, beyond the binary part "
                                    f"of the body ({len(binary) - offset} bytes left).")
        chunk = binary[offset:offset + size]
        array = _bytes_from_binary(chunk, count, name) if datatype == "BYTES" else _numeric_from_binary(
            chunk, dtype, count, name)
        return array.reshape(shape), size
    if "data" not in item:
        raise RequestError(400, f"Input {name!r} has neither 'data' nor parameters.binary_data_size.")
    try:
        if datatype == "BYTES":
            flat = np.array([_as_text(v) for v in np.asarray(item["data"], dtype=object).ravel()], dtype=object)
        else:
            flat = np.asarray(item["data"], dtype=dtype).ravel()
    except (ValueError, TypeError, OverflowError) as exc:
        raise RequestError(400, f"The data of input {name!r} are not {datatype} values ({exc}).") from exc
    if flat.size != count:
        raise RequestError(400, f"Input {name!r} has {flat.size} values but its shape {shape} needs {count}.")
    return flat.reshape(shape), 0


def _as_text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


def _numeric_from_binary(chunk: bytes, dtype: np.dtype, count: int, name: str) -> np.ndarray:
    if len(chunk) != count * dtype.itemsize:
        raise RequestError(400, f"Input {name!r} sent {len(chunk)} bytes; its shape and datatype need "
                                f"{count * dtype.itemsize}.")
    return np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).astype(dtype, copy=True)


def _bytes_from_binary(chunk: bytes, count: int, name: str) -> np.ndarray:
    """BYTES elements in binary form: a 4-byte little-endian length, then the bytes, for each element."""
    values, position = [], 0
    for _ in range(count):
        if position + 4 > len(chunk):
            raise RequestError(400, f"Input {name!r}: the binary BYTES data end before {count} elements.")
        (length,) = struct.unpack_from("<I", chunk, position)
        position += 4
        values.append(chunk[position:position + length].decode("utf-8", errors="replace"))
        position += length
    if position != len(chunk):
        raise RequestError(400, f"Input {name!r}: the binary BYTES data hold more than {count} elements.")
    return np.array(values, dtype=object)


def check_inputs(request: InferRequest, specs: list[TensorMeta], model: str) -> None:
    """Names, datatypes and shapes against the model's signature; RequestError(400) naming the fix."""
    expected = {spec.name: spec for spec in specs}
    unknown = sorted(set(request.inputs) - set(expected))
    if unknown:
        raise RequestError(400, f"Model {model!r} has no input(s) {unknown}; its inputs are {sorted(expected)}.")
    missing = sorted(set(expected) - set(request.inputs))
    if missing:
        raise RequestError(400, f"Model {model!r} needs input(s) {missing} as well.")
    for name, array in request.inputs.items():
        spec = expected[name]
        if DATATYPES[spec.datatype] != array.dtype:
            got = next(k for k, v in DATATYPES.items() if v == array.dtype)
            raise RequestError(400, f"Input {name!r} has datatype {got}; model {model!r} expects {spec.datatype}.")
        if len(array.shape) != len(spec.shape) or any(want not in (-1, got) for want, got in
                                                       zip(spec.shape, array.shape)):
            raise RequestError(400, f"Input {name!r} has shape {list(array.shape)}; model {model!r} expects "
                                    f"{list(spec.shape)} (-1 = any size).")


def check_outputs(request: InferRequest, names: list[str], model: str) -> list[str]:
    """The output names to return (all by default); RequestError(400) for an unknown one."""
    if request.outputs is None:
        return names
    unknown = [n for n in request.outputs if n not in names]
    if unknown:
        raise RequestError(400, f"Model {model!r} has no output(s) {unknown}; its outputs are {names}.")
    return request.outputs


def datatype_of(array: np.ndarray) -> str:
    for datatype, dtype in DATATYPES.items():
        if dtype == array.dtype:
            return datatype
    return "BYTES" if array.dtype.kind in "OSU" else "FP32"


def _to_binary(array: np.ndarray) -> bytes:
    if array.dtype == object or array.dtype.kind in "SU":
        parts = []
        for value in array.ravel():
            raw = value if isinstance(value, bytes) else str(value).encode()
            parts.append(struct.pack("<I", len(raw)) + raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


def _to_json_data(array: np.ndarray) -> list[Any]:
    if array.dtype == object or array.dtype.kind in "SU":
        return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in array.ravel()]
    return array.ravel().tolist()


def _json_ready(array: np.ndarray) -> Any:
    """The flat row-major data of ``array`` as orjson writes it: the array itself when orjson serializes
    its dtype natively, else a list."""
    if array.dtype.kind in "biuf" and array.dtype.isnative:
        return np.ascontiguousarray(array).ravel()
    return _to_json_data(array)


def encode_response(request: InferRequest, outputs: dict[str, np.ndarray], *, model_name: str,
                    model_version: str, parameters: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (JSON, or JSON + binary tensors when asked for)."""
    body: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        body["id"] = request.id
    body["parameters"] = parameters
    entries, blobs = [], []
    for name, array in outputs.items():
        entry: dict[str, Any] = {"name": name, "datatype": datatype_of(array), "shape": list(array.shape)}
        if request.wants_binary(name):
            blob = _to_binary(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
                # JSON has no NaN/Infinity; writing Python's `NaN` token would hand clients invalid JSON
                raise RequestError(500, f"Model {model_name!r} version {model_version} produced NaN or Inf in "
                                        f"output {name!r}, which JSON cannot carry; ask for binary outputs "
                                        "(parameters.binary_data_output: true) to receive the raw IEEE values.")
            entry["data"] = _json_ready(array)
        entries.append(entry)
    body["outputs"] = entries
    # orjson writes numpy arrays directly (float32 as the shortest text that reads back to the same float32)
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      HEADER_LENGTH.lower(): str(len(header))}


def decode_response(body: bytes, header_length: str | None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A protocol response (from a remote server) as (JSON header, outputs by name); ValueError if malformed."""
    binary = b""
    if header_length is not None:
        binary, body = body[int(header_length):], body[:int(header_length)]
    raw = json.loads(body)
    outputs, offset = {}, 0
    for item in raw.get("outputs") or []:
        array, used = _parse_tensor(item, binary, offset)
        offset += used
        outputs[item["name"]] = array
    return raw, outputs


def encode_request(inputs: dict[str, np.ndarray], outputs: list[str] | None, request_id: str | None) -> bytes:
    """A JSON request for a remote server of the same protocol (outputs come back as JSON)."""
    body: dict[str, Any] = {"inputs": [{"name": n, "shape": list(a.shape), "datatype": datatype_of(a),
                                        "data": _to_json_data(a)} for n, a in inputs.items()]}
    if request_id is not None:
        body["id"] = request_id
    if outputs is not None:
        body["outputs"] = [{"name": n} for n in outputs]
    return json.dumps(body, separators=(",", ":")).encode()
