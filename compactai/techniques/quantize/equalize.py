"""Outlier-channel scaling: make per-tensor activation quantization fit transformer encoders.

Dynamic int8 quantizes each MatMul input with one scale per tensor. In BERT-family encoders a
few channels carry activations several times larger than the rest (mostly on the first,
[CLS]-like token), so that one scale wastes most of the 256 levels on them. This pass
measures every quantizable MatMul input per channel on calibration data and, for the
channels whose range exceeds ``threshold`` x the median channel, divides the activation by
``s_j`` (a ``Mul`` before the MatMul) and multiplies row ``j`` of the weight by ``s_j``: the
float model computes the same function, and per-channel weight quantization absorbs the
larger rows. Unlike SmoothQuant's ``s_j = max|X_j|^a / max|W_j|^(1-a)``, channels within the
normal range are left alone (on all-MiniLM-L6-v2 SmoothQuant at a=0.5..1 made int8 *worse*,
while this kept the weights' quantization error where it was; see docs/quantization.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compactai.tasks import Split, trim_padding

SCALED_OPS = ("MatMul", "Attention")  # ops whose input 1 is a [K, N] weight applied to input 0


def activation_ranges(model: Any, tensors: list[str], split: Split, input_names: list[str], samples: int) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each tensor in ``tensors`` over ``samples`` rows of ``split``."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors must survive
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ranges: dict[str, np.ndarray] = {}
    for feeds, _ in split.take(min(samples, len(split))).batches(8):
        feeds = trim_padding(feeds)
        outputs = session.run(tensors, {k: np.ascontiguousarray(feeds[k]) for k in input_names})
        for name, value in zip(tensors, outputs):
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            ranges[name] = np.maximum(ranges[name], peak) if name in ranges else peak
    return ranges


def scale_outlier_channels(
    source: Path,
    target: Path,
    calibration: Split,
    input_names: list[str],
    *,
    threshold: float = 3.0,
    samples: int = 64,
) -> dict[str, Any]:
    """Write the rescaled (float, equivalent) model to ``target``; returns what was scaled."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        if node.op_type in SCALED_OPS and len(node.input) > 1 and node.input[1] in weights:
            if len(weights[node.input[1]].dims) == 2:
                consumers.setdefault(node.input[0], []).append(node)
    if not consumers:
        target.write_bytes(source.read_bytes())
        return {"scaled_inputs": 0, "scaled_channels": 0}
    ranges = activation_ranges(model, sorted(consumers), calibration, input_names, samples)
    inserted: dict[str, Any] = {}
    channels = 0
    for tensor, nodes in consumers.items():
        peak = ranges.get(tensor)
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        if peak is None or any(a.shape[0] != peak.shape[0] for a in arrays):
            continue
        typical = float(np.median(peak))
        if typical <= 0:
            continue
        scale = np.maximum(1.0, peak / (threshold * typical)).astype(np.float32)
        if not (scale > 1.0).any():
            continue
        channels += int((scale > 1.0).sum())
        for node, array in zip(nodes, arrays):
            name = node.input[1]
            weights[name].CopyFrom(numpy_helper.from_array((array * scale[:, None]).astype(array.dtype), name))
        inverse, scaled = f"{tensor}__outlier_scale", f"{tensor}__scaled"
        graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
        inserted[tensor] = helper.make_node("Mul", [tensor, inverse], [scaled], name=f"{tensor}__outlier_mul")
        for node in nodes:
            node.input[0] = scaled
    # each Mul goes right after the node producing its input (graph inputs: first)
    nodes = list(graph.node)
    del graph.node[:]
    pending = dict(inserted)
    graph.node.extend(pending.pop(name) for name in list(pending) if name in {i.name for i in graph.input})
    for node in nodes:
        graph.node.append(node)
        for output in node.output:
            if output in pending:
                graph.node.append(pending.pop(output))
    graph.node.extend(pending.values())
    onnx.save(model, str(target))
    return {"scaled_inputs": len(inserted), "scaled_channels": channels, "threshold": threshold, "samples": samples}


def residual_adds_as_sum(path: Path) -> int:
    """Write the residual ``Add`` that feeds each ``LayerNormalization`` as an equivalent ``Sum``.

    ONNX Runtime fuses Add + LayerNormalization into SkipLayerNormalization; measured on this
    project's CPUs (ORT 1.31, int8 MiniLM) that kernel took ~8x the time of the plain
    LayerNormalization it replaces at batch 32 (``benchmarks/quantization.py`` compares the
    final models). ``Sum`` is the same arithmetic and is not fused. Returns how many changed.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    constants = {i.name for i in graph.initializer} | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    feeds_norm = {n.input[0] for n in graph.node if n.op_type == "LayerNormalization"}
    changed = 0
    for node in graph.node:
        if (
            node.op_type == "Add"
            and len(node.input) == 2
            and node.output[0] in feeds_norm
            and not any(i in constants for i in node.input)
        ):
            node.op_type = "Sum"
            changed += 1
    if changed:
        onnx.save(model, str(path))
    return changed
