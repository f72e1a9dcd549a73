"""Small reference architectures for tests and benchmarks (random init, no downloads).

- :func:`mobilenet_v2_small`: MobileNetV2-style CNN (inverted residuals, depthwise convs,
  linear bottlenecks) for 1- or 3-channel images.
- :func:`mlp`: a plain multi-layer perceptron (hidden neurons to prune).
- :func:`digits_resnet`: the residual CNN of the digits example, at any stage widths.

Each builder returns an ``nn.Module`` (in eval mode, except the digits CNN that is trained next); wrap it with
``compactai.load_model(module, example_inputs)`` to get a handle.
"""

from __future__ import annotations

from typing import Any


def _inverted_residual_class() -> Any:
    import torch
    from torch import nn

    class InvertedResidual(nn.Module):
        """1x1 expand -> 3x3 depthwise -> 1x1 linear projection; identity shortcut when shapes match."""

        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            self.use_residual = stride == 1 and cin == cout
            layers: list[nn.Module] = []
            if expand != 1:
                layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
            layers += [
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),  # depthwise
                nn.BatchNorm2d(hidden),
                nn.ReLU6(),
                nn.Conv2d(hidden, cout, 1, bias=False),  # linear bottleneck: no activation
                nn.BatchNorm2d(cout),
            ]
            self.block = nn.Sequential(*layers)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.block(x)
            return x + out if self.use_residual else out

    return InvertedResidual


# (expansion, output channels, repeats, first stride) per stage, as in the MobileNetV2 paper (scaled down)
MOBILENET_V2_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
)


def mobilenet_v2_small(
    num_classes: int = 10,
    in_channels: int = 1,
    stem_width: int = 16,
    last_width: int = 128,
    stages: tuple[tuple[int, int, int, int], ...] = MOBILENET_V2_STAGES,
) -> Any:
    """A small MobileNetV2-style classifier; returns an nn.Module in eval mode."""
    import torch
    from torch import nn

    block_class = _inverted_residual_class()

    class MobileNetV2Small(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU6()
            )
            blocks: list[nn.Module] = []
            cin = stem_width
            for expand, cout, repeats, stride in stages:
                for i in range(repeats):
                    blocks.append(block_class(cin, cout, stride if i == 0 else 1, expand))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.head = nn.Sequential(nn.Conv2d(cin, last_width, 1, bias=False), nn.BatchNorm2d(last_width), nn.ReLU6())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(last_width, num_classes)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = self.head(self.blocks(self.stem(image)))
            return self.classifier(torch.flatten(self.pool(x), 1))

    return MobileNetV2Small().eval()


def mlp(in_features: int = 64, hidden: tuple[int, ...] = (256, 128), num_classes: int = 10) -> Any:
    """A ReLU multi-layer perceptron; returns an nn.Module in eval mode."""
    from torch import nn

    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers).eval()


def digits_resnet(widths: tuple[int, ...] = (40, 80, 160), num_classes: int = 10) -> Any:
    """The digits example's residual CNN (1-channel images): stem conv, two residual blocks per stage
    (stride 2 between stages), GAP, linear. Returned in training mode, as the example's teacher and
    distillation's ``digits-cnn`` student train it right away."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut: nn.Module = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + self.shortcut(x))

    class DigitsResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
            stages = []
            cin = widths[0]
            for i, width in enumerate(widths):
                stages.append(Block(cin, width, 1 if i == 0 else 2))
                stages.append(Block(width, width, 1))
                cin = width
            self.stages = nn.Sequential(*stages)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(self.pool(self.stages(self.stem(image))), 1))

    return DigitsResNet()


__all__ = ["MOBILENET_V2_STAGES", "digits_resnet", "mlp", "mobilenet_v2_small"]
