"""`compactai federate MODEL --data FILE.npz`: a user's own (untrained) ONNX model and labelled
data, split across simulated clients; the global model learns the user's task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.zoo.users import TabularMLP, _shuffled, _tabular, save_onnx

pytest.importorskip("flwr", reason="needs Flower: make install-federated, then run these tests with build/fed-venv/bin/python (make test does)")

from tests.federated.test_federate_simulation import run_cli


@pytest.fixture(scope="module")
def own_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An untrained tabular MLP saved as ONNX, and breast_cancer as train/calibration/validation/test."""
    root = tmp_path_factory.mktemp("own")
    torch.manual_seed(0)
    x, y = _shuffled(*_tabular(), seed=0)
    model = save_onnx(TabularMLP().eval(), x[:2], root / "tabular.onnx")
    cuts = {"train": slice(0, 340), "calibration": slice(340, 400), "validation": slice(400, 480),
            "test": slice(480, len(x))}
    arrays = {f"{split}/{name}": values[rows] for split, rows in cuts.items()
              for name, values in (("input", x), ("labels", y))}
    np.savez(root / "data.npz", **arrays)
    return model, root / "data.npz"


@pytest.mark.slow
def test_federate_own_model_on_own_data_learns_the_task(own_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = own_model
    out = tmp_path / "fed"
    done = run_cli("federate", str(model), "--data", str(data), "--clients", "3", "--rounds", "3", "--partition", "iid",
                   "--no-alone", "--json", "-o", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["test_accuracy"] > 0.85 and summary["test_accuracy"] > summary["round0_test_accuracy"] + 0.2
    results = json.loads((out / "results.json").read_text())
    assert results["source"]["data"] == str(data)
    assert all(len(c["labels"]) == 2 for c in results["federated"]["clients"])  # two classes, not ten
    assert (out / "model.onnx").exists()


def test_own_data_without_a_model_or_a_train_split_is_refused(own_model: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = own_model
    no_model = run_cli("federate", "--data", str(data), "-o", str(tmp_path / "a"))
    assert no_model.returncode == 2 and "--data needs MODEL" in no_model.stderr
    both = run_cli("federate", str(model), "--data", str(data), "--example", "digits", "-o", str(tmp_path / "b"))
    assert both.returncode == 2 and "exactly one of --example" in both.stderr
    arrays = {k: v for k, v in np.load(data).items() if not k.startswith("train/")}
    np.savez(tmp_path / "no-train.npz", **arrays)
    no_train = run_cli("federate", str(model), "--data", str(tmp_path / "no-train.npz"), "--clients", "2",
                       "--rounds", "1", "-o", str(tmp_path / "c"))
    assert no_train.returncode == 2 and "no labelled train split" in no_train.stderr
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c"))
