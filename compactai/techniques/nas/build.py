"""Rebuild a module from an architecture spec (see space.py), part by part.

A spec is turned into a list of *parts* (plain dicts: stem, one block, the head, one linear
layer), and the model is those parts in order. The latency predictor times each part on its own,
so the model that is built and the parts whose latency is summed are the same by construction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compactai.errors import ParameterError


def parts_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The parts of ``spec`` in order, each with the input shape (per item) it sees."""
    family = spec["family"]
    if family == "cnn":
        return _cnn_parts(spec)
    if family == "mlp":
        return _mlp_parts(spec)
    raise ParameterError(f"Building the '{family}' family from a spec is not supported here; use the cnn or mlp space.")


def _cnn_parts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    channels, height, width = spec["input"]["shape"]
    parts = [{"op": "stem", "cin": channels, "cout": spec["stem"], "kernel": 3, "stride": 1, "size": [height, width]}]
    cin = spec["stem"]
    for stage in spec["stages"]:
        for index in range(stage["depth"]):
            stride = stage["stride"] if index == 0 else 1
            parts.append({"op": stage["block"], "cin": cin, "cout": stage["width"], "kernel": stage["kernel"],
                          "expansion": stage["expansion"], "se": stage["se"], "stride": stride, "size": [height, width]})
            height, width = (height + stride - 1) // stride, (width + stride - 1) // stride
            cin = stage["width"]
    parts.append({"op": "head", "cin": cin, "hidden": spec["head"], "classes": spec["classes"], "size": [height, width]})
    return parts


def _mlp_parts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    features = 1
    for dim in spec["input"]["shape"]:
        features *= dim
    parts = []
    shape = list(spec["input"]["shape"])
    for hidden in spec["hidden"]:
        parts.append({"op": "linear", "cin": features, "cout": hidden, "activation": spec["activation"],
                      "dropout": spec["dropout"], "flatten": shape})
        features, shape = hidden, [hidden]
    parts.append({"op": "linear", "cin": features, "cout": spec["classes"], "activation": None, "dropout": 0.0,
                  "flatten": shape})
    return parts


def part_input_shape(part: dict[str, Any]) -> list[int]:
    """The per-item input shape of ``part`` (batch excluded)."""
    if part["op"] == "linear":
        return list(part["flatten"])
    return [part["cin"], *part["size"]]


class SqueezeExcite(nn.Module):
    """Channel attention (Hu et al.): global pool -> reduce -> expand -> sigmoid gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        reduced = max(8, channels // 4)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, reduced, 1), nn.ReLU(),
                                  nn.Conv2d(reduced, channels, 1), nn.Hardsigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x)


class Block(nn.Module):
    """A CNN block: ``separable`` is MobileNetV2's inverted residual (1x1 expand, kxk depthwise,
    optional SE, 1x1 linear projection); ``plain`` is a kxk conv + BN + ReLU (optional SE).
    Identity shortcut when the shapes match."""

    def __init__(self, part: dict[str, Any]) -> None:
        super().__init__()
        cin, cout, kernel, stride = part["cin"], part["cout"], part["kernel"], part["stride"]
        layers: list[nn.Module] = []
        if part["op"] == "separable":
            hidden = cin * part["expansion"]
            if hidden != cin:
                layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
            layers += [nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
                       nn.BatchNorm2d(hidden), nn.ReLU6()]
            if part["se"]:
                layers.append(SqueezeExcite(hidden))
            layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        else:
            layers += [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
            if part["se"]:
                layers.append(SqueezeExcite(cout))
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return x + out if self.residual else out


def build_part(part: dict[str, Any]) -> nn.Module:
    """The module of one part."""
    op = part["op"]
    if op == "stem":
        return nn.Sequential(nn.Conv2d(part["cin"], part["cout"], part["kernel"], part["stride"], part["kernel"] // 2,
                                       bias=False), nn.BatchNorm2d(part["cout"]), nn.ReLU())
    if op in ("separable", "plain"):
        return Block(part)
    if op == "head":
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        features = part["cin"]
        if part["hidden"]:
            layers += [nn.Linear(features, part["hidden"]), nn.ReLU()]
            features = part["hidden"]
        return nn.Sequential(*layers, nn.Linear(features, part["classes"]))
    if op == "linear":
        layers = [nn.Flatten()] if len(part["flatten"]) > 1 else []
        layers.append(nn.Linear(part["cin"], part["cout"]))
        if part["activation"]:
            layers.append(nn.ReLU() if part["activation"] == "relu" else nn.GELU())
        if part["dropout"]:
            layers.append(nn.Dropout(part["dropout"]))
        return nn.Sequential(*layers)
    raise ParameterError(f"Unknown architecture part '{op}'; known: stem, separable, plain, head, linear.")


def build_model(spec: dict[str, Any], seed: int = 0) -> nn.Module:
    """The (untrained, seeded) model of ``spec``."""
    torch.manual_seed(seed)
    return nn.Sequential(*[build_part(part) for part in parts_of(spec)])


__all__ = ["Block", "SqueezeExcite", "build_model", "build_part", "part_input_shape", "parts_of"]
