"""Float reduction: fp16 and bf16 ONNX variants, offered only when ONNX Runtime on this
machine actually executes them (checked by running the converted model, not assumed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compactai.errors import TechniqueError
from compactai.models.handle import ModelHandle


def convert_float16(source: Path, target: Path) -> Path:
    """fp16 weights and compute, float32 inputs/outputs (ORT's transformer float16 converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    sort_nodes(model.graph)  # the converter appends its input casts last, which the ONNX checker refuses
    onnx.save(model, str(target))
    return target


def sort_nodes(graph: Any) -> None:
    """Put ``graph``'s nodes in topological order (stable: nodes already in order keep it)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:  # a cycle or an input from an outer scope: keep the rest as it was
            ordered += pending
            break
        for node in ready:
            available.update(node.output)
        ordered += ready
        pending = [n for n in pending if all(n is not r for r in ready)]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF
    return ((bits + rounding) >> 16).astype(np.uint16)


def convert_bfloat16(source: Path, target: Path) -> Path:
    """bf16 weights and compute, float32 inputs/outputs: the fp16 graph retyped to bfloat16."""
    import onnx
    from onnx import TensorProto, numpy_helper

    half = target.with_name(target.stem + ".fp16.onnx")
    convert_float16(source, half)
    model = onnx.load(str(half))
    half.unlink()
    graph = model.graph
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            values = numpy_helper.to_array(init).astype(np.float32)
            init.ClearField("int32_data")
            init.raw_data = _to_bfloat16_bits(values).tobytes()
            init.data_type = TensorProto.BFLOAT16
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.BFLOAT16
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                values = numpy_helper.to_array(attr.t).astype(np.float32)
                attr.t.ClearField("int32_data")
                attr.t.raw_data = _to_bfloat16_bits(values).tobytes()
                attr.t.data_type = TensorProto.BFLOAT16
    for info in list(graph.value_info) + list(graph.input) + list(graph.output):
        if info.type.tensor_type.elem_type == TensorProto.FLOAT16:
            info.type.tensor_type.elem_type = TensorProto.BFLOAT16
    onnx.save(model, str(target))
    return target


CONVERTERS = {"fp16": convert_float16, "bf16": convert_bfloat16}


def check_executes(handle: ModelHandle, reference: ModelHandle, dtype: str, tolerance: float = 0.1) -> float:
    """Run the converted model on its example inputs and compare with the float model.

    Raises TechniqueError (saying the type is not offered here) when ONNX Runtime's CPU
    provider cannot load or run it or its outputs diverge; returns the max relative error.
    """
    from compactai.measure import make_runner

    try:
        got = make_runner(handle, "onnxruntime").run(handle.example_inputs)
    except Exception as exc:
        raise TechniqueError(
            f"{dtype} is not offered on this machine: ONNX Runtime's CPU provider cannot execute the {dtype} model "
            f"({str(exc).splitlines()[0][:200]}). Use mode='dynamic' or 'static' (int8) instead."
        ) from exc
    want = make_runner(reference, "onnxruntime").run(reference.example_inputs)
    error = max(float(np.abs(g - w).max() / (np.abs(w).max() + 1e-12)) for g, w in zip(got, want))
    if not np.isfinite(error) or error > tolerance:
        raise TechniqueError(
            f"{dtype} is not offered for this model: its outputs differ from float32 by {error:.3g} (relative), "
            f"above {tolerance:g}. Use int8 (mode='static' or 'dynamic') instead."
        )
    return error


_RUNS: dict[tuple[str, str], bool] = {}  # (model fingerprint, dtype) -> whether ORT runs it here


def float_mode_runs(handle: ModelHandle, dtype: str) -> bool:
    """Whether ONNX Runtime on this machine executes ``handle`` converted to ``dtype`` (fp16/bf16)
    with outputs close to float32: converted and run once, the answer kept for the process."""
    import tempfile

    key = (handle.fingerprint(), dtype)
    if key not in _RUNS:
        with tempfile.TemporaryDirectory(prefix=f"compactai-{dtype}-") as work:
            target = Path(work) / "model.onnx"
            try:
                CONVERTERS[dtype](Path(handle.path), target)  # type: ignore[arg-type]
                check_executes(handle.as_onnx(target), handle, dtype)
                _RUNS[key] = True
            except Exception:  # noqa: BLE001 any failure means ORT does not run it here
                _RUNS[key] = False
    return _RUNS[key]
