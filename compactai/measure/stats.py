"""Size, parameter count and MACs of a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compactai.models.handle import ModelHandle, onnx_files


def size_on_disk(path: Path) -> int:
    """Bytes of the ONNX file plus its external data."""
    return sum(f.stat().st_size for f in onnx_files(path))


def parameter_count(handle: ModelHandle) -> int:
    """Parameters of the torch module, or elements of the ONNX initializers (weights and biases)."""
    if handle.module is not None:
        return int(sum(p.numel() for p in handle.module.parameters()))
    import onnx

    model = onnx.load(str(handle.path))
    return int(sum(int(np.prod(init.dims)) for init in model.graph.initializer if len(init.dims) >= 1))


def count_macs(handle: ModelHandle) -> int | None:
    """Multiply-accumulates of one forward pass at batch 1 on the example inputs.

    Torch modules use torch's FLOP counter (MACs = FLOPs / 2), with formulas added for the fused
    attention kernels it leaves out; ONNX files count Conv, Gemm, MatMul (and their quantized
    forms), GRU, LSTM, RNN and fused attention from inferred shapes. None when unknown.
    """
    if handle.module is not None:
        return _torch_macs(handle)
    counted = _onnx_macs(handle)
    if counted is None and handle.metadata.get("macs") is not None:
        return int(handle.metadata["macs"])  # e.g. quantized: same MACs as the float model it came from
    return counted


def fixed_batch(handle: ModelHandle) -> int:
    """The batch a model's inputs fix (the first axis is the same number > 1 on every input), else 1.

    ONNX exports with a batch-32 example keep batch 32 unless a dynamic axis was asked for; such
    a model cannot run one item, so its "batch-1" latency is measured with the batch it fixes."""
    firsts = {spec.shape[0] if spec.shape else None for spec in handle.inputs}
    if len(firsts) == 1:
        first = firsts.pop()
        if isinstance(first, int) and first > 1:
            return first
    return 1


def _batch_one(handle: ModelHandle) -> dict[str, np.ndarray]:
    """The smallest batch the model runs: one row, or the batch its inputs fix."""
    rows = fixed_batch(handle)
    return {k: v[:rows] for k, v in handle.example_inputs.items()}


def _torch_macs(handle: ModelHandle) -> int | None:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    feeds = _batch_one(handle)
    args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in handle.input_names]
    try:
        with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_attention_formulas()) as counter:
            handle.module(*args)  # type: ignore[misc]
    except Exception:  # noqa: BLE001 some custom modules cannot be traced by the counter
        return None
    return int(counter.get_total_flops() // 2)


def _attention_formulas() -> dict[Any, Any]:
    """FLOP formulas for the fused attention kernels torch's counter has none for on the CPU
    (nn.MultiheadAttention's fast path and scaled_dot_product_attention count 0 without them)."""
    import torch

    def sdpa(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        *batch, length, dim = query
        scores = int(np.prod(batch)) * length * key[-2]
        return 2 * scores * (dim + value[-1])  # Q K^T, then the weights times V

    def native_mha(query: Any, key: Any, value: Any, embed_dim: int, *args: Any, out_shape: Any = None,
                   **kwargs: Any) -> int:
        batch = query[0] if len(query) == 3 else 1
        length, source = query[-2], key[-2]
        projections = (2 * length + 2 * source) * embed_dim * embed_dim  # q and output, k and v
        return 2 * batch * (projections + 2 * length * source * embed_dim)

    ops = torch.ops.aten
    formulas: dict[Any, Any] = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", sdpa),
                          ("_native_multi_head_attention", native_mha)):
        if hasattr(ops, name):
            formulas[getattr(ops, name)] = formula
    return formulas


# ONNX recurrent ops: gates per step (their weights W are [directions, gates x hidden, input])
_RECURRENT_GATES = {"GRU": 3, "LSTM": 4, "RNN": 1}
_ATTENTION_OPS = {"Attention", "MultiHeadAttention"}

_MAC_OPS = {"Conv", "ConvInteger", "QLinearConv", "Gemm", "MatMul", "MatMulInteger", "QLinearMatMul",
            "FusedMatMul", "MatMulNBits", "ConvTranspose"}


def _onnx_macs(handle: ModelHandle) -> int | None:
    import onnx
    from onnx import shape_inference

    try:
        model = onnx.load(str(handle.path))
        feeds = _batch_one(handle)
        for value in model.graph.input:  # pin dynamic axes to the example's sizes
            if value.name in feeds:
                for dim, size in zip(value.type.tensor_type.shape.dim, feeds[value.name].shape):
                    dim.Clear()
                    dim.dim_value = int(size)
        if any(node.domain == "com.microsoft" for node in model.graph.node):
            # fused (contrib) ops such as Attention: ONNX's inference stops at them, ORT's knows them
            model = _symbolic_shapes(model)
        else:
            model = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 (best effort: any failure means "not available")
        return None
    shapes: dict[str, list[int]] = {}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        shapes[value.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in model.graph.node:
        if node.op_type in _RECURRENT_GATES or node.op_type in _ATTENTION_OPS:
            counted = _sequence_macs(node, shapes)
            if counted is None:
                return None
            total += counted
            continue
        if node.op_type not in _MAC_OPS or not node.output:
            continue
        out = shapes.get(node.output[0])
        if not out or any(d < 0 for d in out):
            return None  # shape inference stopped (e.g. at a contrib op): unknown, not undercounted
        total += _node_macs(node, shapes, out)
    return int(total)


def _symbolic_shapes(model: Any) -> Any:
    """ORT's symbolic shape inference, run in a temporary directory: when it gives up it writes
    sym_shape_infer_temp.onnx and external-data files into the working directory."""
    import os
    import tempfile

    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="compactai-shapes-") as scratch:
        os.chdir(scratch)
        try:
            return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
        finally:
            os.chdir(previous)


def _sequence_macs(node: Any, shapes: dict[str, list[int]]) -> int | None:
    """MACs of a recurrent op (every step multiplies the input by W and the state by R) or of a
    fused attention op (projections when it holds the weights, then Q K^T and the weights times V)."""
    inputs = list(node.input)
    x = shapes.get(inputs[0])
    if not x or any(d < 0 for d in x):
        return None
    attrs = {a.name: a for a in node.attribute}
    if node.op_type in _RECURRENT_GATES:
        weight, recurrence = shapes.get(inputs[1]), shapes.get(inputs[2])
        if not weight or not recurrence:
            return None
        batch_first = "layout" in attrs and attrs["layout"].i == 1
        steps, batch = (x[1], x[0]) if batch_first else (x[0], x[1])
        per_step = int(np.prod(weight)) + int(np.prod(recurrence))  # all directions and gates
        return steps * batch * per_step
    batch, length, hidden = x[0], x[-2] if len(x) >= 3 else 1, x[-1]
    macs = 0
    if node.op_type == "Attention" and len(inputs) > 1 and shapes.get(inputs[1]):
        weight = shapes[inputs[1]]  # [hidden, 3 x hidden]: the q, k and v projections in one
        macs += batch * length * int(np.prod(weight))
        hidden = weight[-1] // 3
    source = length
    if node.op_type == "MultiHeadAttention" and len(inputs) > 1 and shapes.get(inputs[1]):
        key = shapes[inputs[1]]
        source = key[-2]  # [batch, sequence, hidden] or [batch, heads, sequence, head size]
    return macs + 2 * batch * length * source * hidden


def _node_macs(node: Any, shapes: dict[str, list[int]], out: list[int]) -> int:
    op = node.op_type
    inputs = list(node.input)
    if op in ("Conv", "ConvInteger", "QLinearConv", "ConvTranspose"):
        weight = shapes.get(inputs[3] if op == "QLinearConv" else inputs[1])
        if not weight:
            return 0
        # out elements x (input channels per group x kernel area)
        return int(np.prod(out)) * int(np.prod(weight[1:]))
    if op == "MatMulNBits":
        attrs = {a.name: a for a in node.attribute}
        k = attrs["K"].i if "K" in attrs else 0
        return int(np.prod(out)) * int(k)
    a_name = inputs[0]
    a = shapes.get(a_name)
    if not a:
        return 0
    k = a[-1]
    if op == "Gemm":
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        k = a[0] if trans_a else a[-1]
    return int(np.prod(out)) * int(k)
