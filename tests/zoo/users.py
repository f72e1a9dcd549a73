"""User-style models, as people bring them to compactai: a MobileNetV2-style CNN (ONNX and
``.pt2``), a tabular MLP (ONNX) and a 1D-conv + GRU sequence classifier (ONNX).

Each is trained for a few seconds on a data set bundled with scikit-learn (so its outputs depend
on its input, as a real model's do), saved the way a user would save it (``torch.onnx.export`` /
``torch.export.save``), and comes with a ``data.npz`` in the layout ``--data`` reads
('<split>/<input>' arrays and '<split>/labels'). Seeded: the same call gives the same files.

- ``mobilenet``: digits 8x8 upsampled to 1x16x16; inverted residual blocks (1x1 expand, 3x3
  depthwise, 1x1 project, residual when shapes match), ReLU6, BatchNorm.
- ``tabular``: breast_cancer's 30 standardised features -> 64 -> 32 -> 2.
- ``sensor``: digits rows as a sequence of 8 steps of 8 features; Conv1d over time, GRU, linear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT = "input"
OUTPUT = "logits"


def _inverted_residual(cin: int, cout: int, stride: int, expand: int) -> nn.Module:
    hidden = cin * expand
    layers: list[nn.Module] = []
    if expand != 1:
        layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
    layers += [
        nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
        nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
    ]
    return _Block(nn.Sequential(*layers), residual=stride == 1 and cin == cout)


class _Block(nn.Module):
    def __init__(self, body: nn.Module, residual: bool) -> None:
        super().__init__()
        self.body = body
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2Style(nn.Module):
    """A small MobileNetV2: stem, inverted residual stages (t, c, n, s), 1x1 head conv, pool, fc."""

    STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2))

    def __init__(self, classes: int = 10, width: float = 0.5, head: int = 96) -> None:
        super().__init__()
        stem = round(16 * width)
        layers: list[nn.Module] = [nn.Conv2d(1, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU6()]
        cin = stem
        for expand, channels, repeats, stride in self.STAGES:
            cout = round(channels * width)
            for i in range(repeats):
                layers.append(_inverted_residual(cin, cout, stride if i == 0 else 1, expand))
                cin = cout
        layers += [nn.Conv2d(cin, head, 1, bias=False), nn.BatchNorm2d(head), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(head, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class TabularMLP(nn.Module):
    def __init__(self, features: int = 30, classes: int = 2) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                                 nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvGRU(nn.Module):
    """(batch, steps, features) -> Conv1d over time -> GRU -> last hidden state -> logits."""

    def __init__(self, features: int = 8, channels: int = 24, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv1d(features, channels, 3, padding=1)
        self.gru = nn.GRU(channels, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x.transpose(1, 2))).transpose(1, 2)
        out, _ = self.gru(h)
        return self.fc(out[:, -1])


@dataclass
class UserModel:
    """A trained user-style model: the module, its data arrays and its saved files."""

    name: str
    module: nn.Module
    x: np.ndarray
    y: np.ndarray
    onnx: Path
    data: Path
    pt2: Path | None = None

    def accuracy(self) -> float:
        with torch.no_grad():
            logits = self.module(torch.from_numpy(self.x[-len(self.x) // 4:]))
        return float((logits.argmax(1).numpy() == self.y[-len(self.y) // 4:]).mean())


def _digits_images() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    return np.kron(images, np.ones((2, 2), np.float32))[:, None], digits.target.astype(np.int64)


def _digits_sequences() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def _tabular() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    x = (x - x.mean(0)) / x.std(0)
    return x.astype(np.float32), data.target.astype(np.int64)


def _shuffled(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(len(x))
    return x[order], y[order]


def _train(module: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int, lr: float = 3e-3) -> None:
    """Adam on the first half of (x, y) — the rest is calibration/validation/test."""
    torch.manual_seed(seed)
    train_x, train_y = torch.from_numpy(x[: len(x) // 2]), torch.from_numpy(y[: len(y) // 2])
    optimiser = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(train_x)).split(64):
            optimiser.zero_grad()
            nn.functional.cross_entropy(module(train_x[batch]), train_y[batch]).backward()
            optimiser.step()
    module.eval()


def write_data(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    """The ``--data`` file: the second half of (x, y) as calibration, validation and test splits."""
    half = x[len(x) // 2:], y[len(y) // 2:]
    n = len(half[0])
    cuts = {"calibration": slice(0, n // 4), "validation": slice(n // 4, n // 2), "test": slice(n // 2, n)}
    arrays = {}
    for split, rows in cuts.items():
        arrays[f"{split}/{INPUT}"] = half[0][rows]
        arrays[f"{split}/labels"] = half[1][rows]
    np.savez(path, **arrays)
    return path


def save_onnx(module: nn.Module, sample: np.ndarray, path: Path) -> Path:
    """As a user would: ``torch.onnx.export`` with a dynamic batch axis."""
    torch.onnx.export(module, (torch.from_numpy(sample),), str(path), input_names=[INPUT], output_names=[OUTPUT],
                      dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}}, dynamo=False)
    return path


def save_pt2(module: nn.Module, sample: np.ndarray, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(module, (torch.from_numpy(sample),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


BUILDERS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[np.ndarray, np.ndarray]], int]] = {
    "mobilenet": (MobileNetV2Style, _digits_images, 3),
    "tabular": (TabularMLP, _tabular, 30),
    "sensor": (ConvGRU, _digits_sequences, 8),
}


def build(name: str, directory: Path, seed: int = 0, pt2: bool = False, **sizes: float) -> UserModel:
    """Train the user-style model ``name`` (see BUILDERS; ``sizes`` go to its constructor, e.g.
    ``width=1.0`` for a full-width MobileNetV2 in a benchmark) and write ``name.onnx`` (+ ``.pt2``)
    and ``name-data.npz`` into ``directory``."""
    make, load, epochs = BUILDERS[name]
    torch.manual_seed(seed)
    module = make(**sizes)
    x, y = _shuffled(*load(), seed)
    _train(module, x, y, epochs, seed)
    directory.mkdir(parents=True, exist_ok=True)
    model = UserModel(name, module, x, y, save_onnx(module, x[:2], directory / f"{name}.onnx"),
                      write_data(directory / f"{name}-data.npz", x, y))
    if pt2:
        model.pt2 = save_pt2(module, x[:2], directory / f"{name}.pt2")
    return model
