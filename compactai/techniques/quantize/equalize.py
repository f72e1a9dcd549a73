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
        if (node.op_type in SCALED_OPS and len(node.input) > 1 and node.input[1] in weights
                and len(weights[node.input[1]].dims) == 2):
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


def explicit_head_counts(source: Path, target: Path) -> int:
    """Write ``source`` to ``target`` with each attention reshape's head count spelled out.

    Hugging Face encoders reshape Q/K/V to ``(batch, seq, -1, head_size)``. ONNX Runtime's
    attention fusion reads the head count from that shape and, finding ``-1``, falls back to one
    model-wide count, so an encoder whose layers kept different numbers of heads (after head
    pruning) gets no fused attention at all and runs slower once quantized. Replacing the ``-1``
    by the layer's own count (the width of the projection feeding the reshape / head size) lets
    the fusion detect every layer. Returns how many reshapes changed; ``target`` is written even
    when none did.
    """
    import onnx
    import onnx.helper
    from onnx import numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    initializers = {i.name: i for i in graph.initializer}

    def constant(name: str) -> np.ndarray | None:
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        node = producers.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        if node is not None and node.op_type == "Identity":  # the exporter aliases equal initializers
            return constant(node.input[0])
        return None

    def width(name: str) -> int | None:
        """Output width of a biased projection (MatMul + Add with a constant 1-D bias)."""
        node = producers.get(name)
        if node is None or node.op_type != "Add":
            return None
        for value in (constant(i) for i in node.input):
            if value is not None and value.ndim == 1:
                return int(value.shape[0])
        return None

    changed = 0
    nodes = []
    for node in graph.node:
        concat = producers.get(node.input[1]) if node.op_type == "Reshape" and len(node.input) > 1 else None
        if concat is not None and concat.op_type == "Concat" and len(concat.input) == 4:
            heads, size = constant(concat.input[2]), constant(concat.input[3])
            projection = width(node.input[0])
            head_size = int(size.reshape(-1)[0]) if size is not None and size.size == 1 else 0
            if (heads is not None and heads.size == 1 and int(heads.reshape(-1)[0]) == -1 and projection
                    and head_size > 0 and projection % head_size == 0):
                # the exporter shares one shape Concat between reshapes (and layers): each gets its own
                name = f"{node.name or node.output[0]}/explicit_heads"
                graph.initializer.append(numpy_helper.from_array(
                    np.array([projection // head_size], dtype=heads.dtype).reshape(heads.shape), name))
                inputs = list(concat.input)
                inputs[2] = name
                axis = next((a.i for a in concat.attribute if a.name == "axis"), 0)
                nodes.append(onnx.helper.make_node("Concat", inputs, [name + "/shape"], name=name + "/concat",
                                                   axis=axis))
                node.input[1] = name + "/shape"
                changed += 1
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(target))
    return changed
