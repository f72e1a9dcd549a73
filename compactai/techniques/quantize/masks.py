"""Keep static int8 away from attention masks, and refuse scales no int8 tensor can use.

Transformers turn the 0/1 attention mask into an additive bias of 0 or the float minimum
(about -3.4e38) and add it to the attention scores. Calibrated like any activation, the bias
and the masked scores get a scale near 1e36 (or ``inf``): every score then rounds to the same
integer, attention becomes uniform, and the model's output stops depending on its input. So the
mask's own computation and the elementwise op that mixes it into the scores stay in float, and
every scale of a quantized model is checked afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# Ops after which a tensor carries only the shape of its input, not its values.
SHAPE_OPS = ("Shape", "Size")
# Elementwise ops that mix a mask bias into data (kept float); fused ops (Attention) take the
# mask as an integer input and quantize fine, so they are never excluded.
MIXING_OPS = ("Add", "Sub", "Mul", "Div", "Where", "Max", "Min")
# A scale this large means a calibrated range of ~1e12 or more: no real activation; a mask value.
MAX_SCALE = 1e10


def mask_inputs(model: Any) -> list[str]:
    """Graph inputs that are attention masks (by name, as tokenizers and exporters call them)."""
    initializers = {i.name for i in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in initializers and "mask" in v.name.lower()]


def mask_path_nodes(model_path: Path) -> list[str]:
    """Names of the nodes that compute from an attention mask alone, of the elementwise nodes
    that mix such a tensor into data (scores + mask bias) and of the nodes reading their
    output, in graph order."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    masks = set(mask_inputs(model))
    if not masks:
        return []
    initializers = {i.name for i in model.graph.initializer}
    # the graph inputs whose values reach each tensor; constants and shapes carry none
    sources: dict[str, frozenset[str]] = {
        v.name: frozenset([v.name]) for v in model.graph.input if v.name not in initializers
    }
    excluded = []
    mixed: set[str] = set()  # outputs of the mixing ops: masked scores, with the bias in them
    for node in model.graph.node:  # ONNX graphs are topologically sorted
        reached = frozenset().union(*(sources.get(i, frozenset()) for i in node.input if i))
        if node.op_type in SHAPE_OPS:
            reached = frozenset()
        mask_only = bool(reached) and reached <= masks
        mixes = (
            node.op_type in MIXING_OPS
            and not mask_only
            and any(sources.get(i) and sources[i] <= masks for i in node.input if i)
        )
        # the op reading masked scores (Softmax) would quantize them at its input (QDQ): float too
        if mask_only or mixes or mixed & set(node.input):
            excluded.append(node.name)
        if mixes:
            mixed.update(node.output)
        for output in node.output:
            sources[output] = reached
    return [n for n in excluded if n]


def unbounded_scales(model_path: Path, limit: float = MAX_SCALE) -> dict[str, float]:
    """Quantization scales of a quantized model that are not finite or exceed ``limit``, by the
    tensor they quantize (ORT names a tensor's scale ``<tensor>_scale``)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    scale_inputs = {
        node.input[1]
        for node in model.graph.node
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and len(node.input) > 1
    }
    bad = {}
    for init in model.graph.initializer:
        if init.name in scale_inputs or init.name.endswith("_scale"):
            values = numpy_helper.to_array(init).astype(np.float64)
            worst = float(np.max(np.abs(values))) if values.size else 0.0
            if not np.all(np.isfinite(values)) or worst > limit:
                bad[init.name.removesuffix("_scale")] = worst
    return bad


def nodes_touching(model_path: Path, tensors: list[str]) -> list[str]:
    """Names of the nodes of a (float) model that produce or consume any of ``tensors``."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    wanted = set(tensors)
    return [n.name for n in model.graph.node if n.name and wanted & (set(n.input) | set(n.output))]
