"""A trainable torch module from a float ONNX model, so federated training can start from the
``model.onnx`` that ``compactai prune`` or ``distill`` wrote (already compressed).

The graph is run node by node with torch functions; float initializers become parameters
(integer ones, such as Reshape's shape, stay constants). Only the operators that compactai's
exports of CNNs and MLPs contain are known (``OPS``); any other, and any quantized graph,
is refused in one line (quantize after federating, not before).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from compactai.errors import BadInputError


def _attrs(node: Any) -> dict[str, Any]:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pads(pads: list[int] | None, dims: int) -> tuple[list[int], list[int] | None]:
    """ONNX pads (begin..., end...) as torch's symmetric padding, or an explicit F.pad list."""
    if not pads:
        return [0] * dims, None
    begin, end = pads[:dims], pads[dims:]
    if begin == end:
        return list(begin), None
    explicit: list[int] = []
    for b, e in zip(reversed(begin), reversed(end)):
        explicit += [b, e]
    return [0] * dims, explicit


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, **a: Any) -> torch.Tensor:
    dims = w.dim() - 2
    padding, explicit = _pads(a.get("pads"), dims)
    if explicit:
        x = F.pad(x, explicit)
    conv = F.conv1d if dims == 1 else F.conv2d
    return conv(x, w, b, stride=a.get("strides", 1), padding=padding, dilation=a.get("dilations", 1),
                groups=a.get("group", 1))


def _gemm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None, **a: Any) -> torch.Tensor:
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = a.get("alpha", 1.0) * (x @ w)
    return y + a.get("beta", 1.0) * b if b is not None else y


def _pool(kind: str) -> Callable[..., torch.Tensor]:
    def run(x: torch.Tensor, **a: Any) -> torch.Tensor:
        kernel = a["kernel_shape"]
        padding, explicit = _pads(a.get("pads"), len(kernel))
        if explicit:
            x = F.pad(x, explicit)
        if kind == "max":
            return F.max_pool2d(x, kernel, stride=a.get("strides", kernel), padding=padding,
                                ceil_mode=bool(a.get("ceil_mode", 0)))
        return F.avg_pool2d(x, kernel, stride=a.get("strides", kernel), padding=padding,
                            ceil_mode=bool(a.get("ceil_mode", 0)),
                            count_include_pad=bool(a.get("count_include_pad", 0)))

    return run


def _batchnorm(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
               **a: Any) -> torch.Tensor:
    return F.batch_norm(x, mean.detach(), var.detach(), scale, bias, training=False, eps=a.get("epsilon", 1e-5))


OPS: dict[str, Callable[..., torch.Tensor]] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda x, w, **a: x @ w,
    "Add": lambda x, y, **a: x + y,
    "Sub": lambda x, y, **a: x - y,
    "Mul": lambda x, y, **a: x * y,
    "Div": lambda x, y, **a: x / y,
    "Relu": lambda x, **a: F.relu(x),
    "Sigmoid": lambda x, **a: torch.sigmoid(x),
    "Tanh": lambda x, **a: torch.tanh(x),
    "Identity": lambda x, **a: x,
    "Dropout": lambda x, *rest, **a: x,
    "Flatten": lambda x, **a: torch.flatten(x, a.get("axis", 1)) if a.get("axis", 1) > 0 else x.reshape(1, -1),
    "Reshape": lambda x, shape, **a: x.reshape([int(v) if int(v) != 0 else x.shape[i]
                                                for i, v in enumerate(shape.tolist())]),
    "GlobalAveragePool": lambda x, **a: x.mean(dim=tuple(range(2, x.dim())), keepdim=True),
    "MaxPool": _pool("max"),
    "AveragePool": _pool("avg"),
    "BatchNormalization": _batchnorm,
    "Softmax": lambda x, **a: torch.softmax(x, dim=a.get("axis", -1)),
}


class OnnxModule(nn.Module):
    """Runs an ONNX graph with torch ops; float initializers are trainable parameters."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        graph = model.graph
        self.nodes = [(n.op_type, list(n.input), list(n.output), _attrs(n)) for n in graph.node]
        self.names: dict[str, str] = {}
        self.weights = nn.ParameterDict()
        self.constants: dict[str, torch.Tensor] = {}
        for init in graph.initializer:
            value = numpy_helper.to_array(init)
            key = re.sub(r"\W", "_", init.name) or "w"
            while key in self.weights:
                key += "_"
            if value.dtype.kind == "f":
                self.names[init.name] = key
                self.weights[key] = nn.Parameter(torch.from_numpy(np.array(value, dtype=np.float32)))
            else:
                self.constants[init.name] = torch.from_numpy(np.array(value))
        initialized = {i.name for i in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initialized]
        self.output_names = [o.name for o in graph.output]

    def forward(self, *inputs: torch.Tensor) -> Any:
        values: dict[str, Any] = dict(zip(self.input_names, inputs))
        for op, names, outputs, attrs in self.nodes:
            args = [self._value(name, values) for name in names]
            while args and args[-1] is None:  # trailing optional inputs left out
                args.pop()
            values[outputs[0]] = OPS[op](*args, **attrs)
        results = [values[name] for name in self.output_names]
        return results[0] if len(results) == 1 else tuple(results)

    def _value(self, name: str, values: dict[str, Any]) -> Any:
        if not name:
            return None
        if name in values:
            return values[name]
        if name in self.names:
            return self.weights[self.names[name]]
        return self.constants[name]


def onnx_to_torch(path: str | Path) -> OnnxModule:
    """The trainable module of a float ONNX file; refuses graphs with operators it cannot train."""
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    unknown = sorted(ops - set(OPS))
    if unknown:
        quantized = [op for op in unknown if "Quant" in op or op.startswith("QLinear") or "Integer" in op]
        hint = ("it is quantized: federate the float model and quantize the federated output instead"
                if quantized else "start from a .pt2 file or a --model architecture instead")
        raise BadInputError(f"{path} uses ONNX operators federate cannot train ({', '.join(unknown)}); {hint}.")
    if any(n.domain not in ("", "ai.onnx") for n in model.graph.node):
        raise BadInputError(f"{path} uses custom-domain operators; federate trains standard float ONNX graphs only.")
    module = OnnxModule(model)
    module.eval()
    return module
