"""MACs of recurrent and attention layers (ONNX and torch count the same, and match a hand count),
and a .pt2 program gets the kind its graph shows, as the ONNX export of the same model does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from compactai import load_model
from compactai.measure import count_macs


def _sensor_by_hand(steps: int = 8, features: int = 8, channels: int = 24, hidden: int = 32, classes: int = 10) -> int:
    conv = steps * channels * features * 3  # Conv1d, kernel 3, padding 1: one output per step
    gru = steps * 3 * hidden * (channels + hidden)  # 3 gates, input and recurrent weights, every step
    return conv + gru + hidden * classes


@pytest.mark.slow
def test_conv_gru_macs_match_a_hand_count_on_onnx_and_torch(user_zoo) -> None:
    model = user_zoo("sensor")
    expected = _sensor_by_hand()
    assert count_macs(load_model(model.onnx)) == expected
    assert count_macs(load_model(model.module, torch.from_numpy(model.x[:1]))) == expected


def _export(module: nn.Module, sample: torch.Tensor, path: Path) -> Path:
    torch.onnx.export(module, (sample,), str(path), input_names=["x"], output_names=["y"], dynamo=False)
    return path


class _LastStep(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)[0]


@pytest.mark.parametrize("kind,gates", [("LSTM", 4), ("RNN", 1), ("GRU", 3)])
def test_recurrent_onnx_macs_count_every_step_and_gate(tmp_path: Path, kind: str, gates: int) -> None:
    steps, inputs, hidden = 5, 6, 7
    layer = getattr(nn, kind)(inputs, hidden, batch_first=True).eval()
    sample = torch.randn(1, steps, inputs)
    path = _export(_LastStep(layer), sample, tmp_path / f"{kind}.onnx")
    assert count_macs(load_model(path)) == steps * gates * hidden * (inputs + hidden)


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def test_attention_macs_are_counted_on_torch_and_onnx(tmp_path: Path) -> None:
    """nn.MultiheadAttention's fused CPU kernel (and scaled_dot_product_attention) count 0 in
    torch's FLOP counter without compactai's formulas."""
    length, dim = 10, 32
    by_hand = 4 * length * dim * dim + 2 * length * length * dim  # q, k, v, out projections; QK^T and AV
    module = _Attention(dim, 4).eval()
    sample = torch.randn(1, length, dim)
    assert count_macs(load_model(module, sample)) == by_hand
    assert count_macs(load_model(_export(module, sample, tmp_path / "attention.onnx"))) == by_hand


class _Sdpa(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.scaled_dot_product_attention(x, x, x)


def test_scaled_dot_product_attention_macs() -> None:
    batch, heads, length, dim = 1, 2, 6, 8
    sample = torch.randn(batch, heads, length, dim)
    assert count_macs(load_model(_Sdpa(), sample)) == 2 * batch * heads * length * length * dim


@pytest.mark.slow
def test_pt2_program_kind_comes_from_its_graph_as_for_onnx(user_zoo) -> None:
    model = user_zoo("mobilenet")
    program = load_model(model.pt2)
    assert program.kind == load_model(model.onnx).kind == "cnn"
    assert count_macs(program) == count_macs(load_model(model.onnx))
