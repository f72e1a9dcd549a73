"""Size bounds checked on an ONNX file before anything is allocated for it.

A file of a few hundred bytes can declare an input of 3e9 floats (the example inputs made
from the signature would need 22 GiB) or a ``ConstantOfShape`` of 8 GiB that ONNX Runtime
allocates on the first run. Such a model is refused with one line naming the tensor, instead
of ending in ``MemoryError`` or in the kernel's out-of-memory killer on a shared machine.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from compactai.errors import BadInputError, InputSignatureError

MAX_TENSOR_BYTES = 2 * 2**30  # one tensor; weights live in initializers and are not bounded here
EXAMPLE_BATCH, EXAMPLE_SEQUENCE = 1, 16  # how dynamic axes are filled for example inputs (models/load.py)


def _dtype(elem_type: int) -> np.dtype:
    from onnx import helper

    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return np.dtype(np.float32)


def _dims(value: Any, dynamic: tuple[int, int] | None) -> list[int] | None:
    """Static dims of a value_info; dynamic axes become ``dynamic`` (batch, other) or make it None."""
    dims = []
    for i, dim in enumerate(value.type.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        elif dynamic is not None:
            dims.append(dynamic[0] if i == 0 else dynamic[1])
        else:
            return None
    return dims


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def _weights_as_inputs(model: Any, keep_bytes: int = 4096) -> None:
    """Turn large initializers into typed graph inputs: shape inference then sees the same shapes
    without copying the weights (5.5 s -> well under a second on MiniLM), and the small ones that
    shape computations read (Reshape targets, ConstantOfShape sizes) stay as values."""
    from onnx import helper

    graph = model.graph
    kept = []
    for tensor in graph.initializer:
        if len(tensor.raw_data) > keep_bytes or tensor.data_location == 1:  # 1: TensorProto.EXTERNAL
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
        else:
            kept.append(tensor)
    del graph.initializer[:]
    graph.initializer.extend(kept)


def check_onnx_sizes(path: str | Path, max_bytes: int = MAX_TENSOR_BYTES) -> None:
    """Raise InputSignatureError when an input (at batch 1, dynamic axes 16) would exceed
    ``max_bytes``, and BadInputError when shape inference shows a node output above it."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 an unreadable file is refused by the loader with its own message
        return
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    for value in graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        dims = _dims(value, (EXAMPLE_BATCH, EXAMPLE_SEQUENCE)) or []
        nbytes = math.prod(dims) * _dtype(value.type.tensor_type.elem_type).itemsize
        if nbytes > max_bytes:
            raise InputSignatureError(
                f"{path.name} declares input '{value.name}' with shape {dims} ({_gib(nbytes)} per sample), more "
                f"than the {_gib(max_bytes)} allowed for one tensor; re-export it with the real input shape."
            )
    _weights_as_inputs(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 inference is best effort: models it cannot follow are still run (and bounded by the runner)
        return
    producers = {out: node for node in inferred.graph.node for out in node.output}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        if not value.type.HasField("tensor_type"):
            continue
        static = _dims(value, None)
        if not static:
            continue
        nbytes = math.prod(static) * _dtype(value.type.tensor_type.elem_type).itemsize
        if nbytes > max_bytes:
            node = producers.get(value.name)
            made_by = f"node '{node.name or value.name}' ({node.op_type})" if node is not None else f"'{value.name}'"
            raise BadInputError(
                f"{path.name}: {made_by} makes a tensor of shape {static} ({_gib(nbytes)}), more than the "
                f"{_gib(max_bytes)} allowed for one tensor; check the model's shapes before running it."
            )
