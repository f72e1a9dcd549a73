"""Shared fixtures: small real models, the built-in examples (trained once per cache dir)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

torch.set_num_threads(2)


class SmallResidualCNN(nn.Module):
    """Residual CNN small enough for fast tests: conv, BN, a residual block, linear."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.stem(image)
        x = torch.relu(x + self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture
def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallResidualCNN().eval()


@pytest.fixture
def small_handle(small_cnn: nn.Module):
    from compactai import load_model

    return load_model(small_cnn, torch.randn(1, 1, 16, 16), name="small-cnn")


@pytest.fixture
def small_onnx(small_handle, tmp_path: Path) -> Path:
    return small_handle.to_onnx(tmp_path / "small.onnx").path


@pytest.fixture(scope="session", autouse=True)
def _cache_dir() -> None:
    """Examples are cached under COMPACTAI_CACHE_DIR if set, else the user cache dir (shared
    across runs, so the digits teacher trains once per machine)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def digits():
    from compactai import load_example

    return load_example("digits")


@pytest.fixture(scope="session")
def minilm():
    from compactai import load_example

    return load_example("minilm")


def random_images(n: int = 4, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, 1, size, size)).astype(np.float32)


@pytest.fixture(scope="session")
def user_zoo(tmp_path_factory: pytest.TempPathFactory):
    """``user_zoo("mobilenet"|"tabular"|"sensor")``: a user-style model trained once per test run
    (tests/zoo/users.py), with its ONNX file, data.npz and (for mobilenet) a .pt2."""
    from tests.zoo.users import UserModel, build

    built: dict[str, UserModel] = {}
    root = tmp_path_factory.mktemp("user-zoo")

    def get(name: str) -> UserModel:
        if name not in built:
            built[name] = build(name, root, pt2=name == "mobilenet")
        return built[name]

    return get
