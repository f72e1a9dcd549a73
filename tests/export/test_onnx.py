from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from compactai import load_model
from compactai.errors import ParityError
from compactai.export import check_parity, export_onnx


class DivergesInExport(nn.Module):
    """Adds 0.5 to the second output only while being exported: a parity bug to catch."""

    def forward(self, x: torch.Tensor):
        shift = 0.5 if torch.onnx.is_in_onnx_export() else 0.0
        return x * 2, x + shift


def test_export_keeps_dynamic_batch_and_parity(small_handle, tmp_path):
    onnx_handle = export_onnx(small_handle, tmp_path / "m.onnx")
    assert onnx_handle.metadata["parity"]["ok"]
    assert onnx_handle.metadata["parity"]["max_abs_diff"]["output"] < 1e-4
    batch = np.random.default_rng(1).standard_normal((5, 1, 16, 16)).astype(np.float32)
    report = check_parity(small_handle, onnx_handle, {"image": batch})
    assert report.ok


def test_transformer_export_has_dynamic_sequence(minilm, tmp_path):
    onnx_handle = export_onnx(minilm.handle, tmp_path / "enc.onnx")
    feeds = next(minilm.task.split("test").take(8).batches(8))[0]
    assert feeds["input_ids"].shape[1] != minilm.handle.example_inputs["input_ids"].shape[1]
    report = check_parity(minilm.handle, onnx_handle, feeds, tolerance=1e-3)
    assert report.ok, report.max_abs_diff


def test_parity_failure_names_the_output(tmp_path):
    handle = load_model(DivergesInExport(), torch.randn(1, 4), output_names=["doubled", "shifted"])
    with pytest.raises(ParityError, match=r"output 'shifted'.*0\.5"):
        export_onnx(handle, tmp_path / "bad.onnx")
