"""Which torch layer types the techniques work on: the one definition pruning and QAT share.

Pruning ranks, removes and protects the weights of every linear and convolution layer
(transposed convolutions too: the dependency graph of torch-pruning handles them). QAT wraps
the same layers in fake quantizers except transposed convolutions, whose forward pass takes an
output size and cannot be re-run with a fake-quantized weight through ``_conv_forward``.
"""

from __future__ import annotations

from typing import Any


def prunable_types() -> tuple[type, ...]:
    """nn.Linear and every convolution (1-3 D, transposed too)."""
    from torch import nn

    return (nn.Linear, nn.modules.conv._ConvNd)


def quantizable_types() -> tuple[type, ...]:
    """The prunable types that QAT fake-quantizes: transposed convolutions excluded."""
    from torch import nn

    return (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_layer_names(module: Any) -> list[str]:
    """Names of the prunable layers of ``module``, in definition order."""
    types = prunable_types()
    return [name for name, layer in module.named_modules() if isinstance(layer, types)]


__all__ = ["prunable_layer_names", "prunable_types", "quantizable_types"]
