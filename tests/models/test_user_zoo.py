"""The user-style zoo loads as users' files: each ONNX (and the .pt2) keeps its head, its outputs
depend on its input, and quality on its data.npz is the accuracy of the trained model."""

from __future__ import annotations

import numpy as np
import pytest

from compactai import load_model
from compactai.measure import make_runner
from compactai.tasks import Task, output_kind


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet", "tabular", "sensor"])
def test_user_model_loads_with_its_head_and_scores_on_its_data(user_zoo, name: str) -> None:
    model = user_zoo(name)
    handle = load_model(model.onnx)
    assert handle.output_names == ["logits"]
    assert output_kind(handle) == "logits"
    runner = make_runner(handle, "onnxruntime")
    task = Task.from_npz(model.data, handle.inputs, runner.run, kind=output_kind(handle))
    assert task.baseline > 0.75  # trained: far above chance (0.1 for digits, about 0.6 for breast_cancer)
    logits = runner.run({"input": np.load(model.data)["test/input"][:8]})[0]
    assert logits.shape[0] == 8 and np.ptp(logits, axis=0).max() > 0.1


@pytest.mark.slow
def test_user_mobilenet_pt2_loads_as_a_torch_program(user_zoo) -> None:
    model = user_zoo("mobilenet")
    handle = load_model(model.pt2)
    assert handle.framework == "torch"
    assert handle.output_names  # the program's outputs are kept
