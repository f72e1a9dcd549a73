"""Static int8 and attention masks: the mask path stays float, unbounded scales are repaired or
refused, a collapsed int8 model is refused, and the tiny BERT classifier's static int8 agrees
with the float model (or is refused)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compactai import load_model
from compactai.tasks import Accuracy, ClassifierFidelity, Split, Task
from compactai.techniques import Context, create_technique
from compactai.techniques.quantize import QualityTargetNotMetError
from compactai.techniques.quantize.masks import mask_path_nodes, unbounded_scales
from compactai.techniques.quantize.ort_ptq import Int8Config, _quantize_once, quantize_int8
from tests.zoo.hf import bert_classifier_dir, token_npz

STATIC_QDQ = Int8Config(mode="static", format="qdq", calibration_samples=32)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT classifier trained for a few seconds, its ONNX export and its task data."""
    root = tmp_path_factory.mktemp("bert")
    directory = bert_classifier_dir(root / "bert", train_steps=60)
    data = token_npz(root / "data.npz", directory, labels=2)
    onnx_path = load_model(directory).to_onnx(root / "bert.onnx").path
    arrays = dict(np.load(data, allow_pickle=False))
    splits = {
        s: Split({n: arrays[f"{s}/{n}"] for n in ("input_ids", "attention_mask")}, arrays[f"{s}/labels"])
        for s in ("calibration", "validation", "test")
    }
    return {"dir": directory, "data": data, "onnx": onnx_path, "splits": splits}


def _runner(path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def _agreement(float_path, int8_path, split):
    value, details = ClassifierFidelity(_runner(float_path)).score(_runner(int8_path), split, 16)
    return value, details


def test_mask_path_is_found_from_the_mask_input(bert):
    nodes = mask_path_nodes(bert["onnx"])
    model = onnx.load(str(bert["onnx"]))
    by_name = {n.name: n for n in model.graph.node}
    kinds = {by_name[n].op_type for n in nodes}
    assert {"Where", "Add", "Softmax"} <= kinds  # the bias, scores + bias, and the op reading them
    assert "MatMul" not in kinds and "Gemm" not in kinds  # weights stay quantizable
    assert sum(1 for n in nodes if by_name[n].op_type == "Softmax") == 2  # one per layer


def test_plain_static_int8_breaks_the_mask_and_quantize_int8_does_not(bert, tmp_path):
    calibration = bert["splits"]["calibration"]
    names = ["input_ids", "attention_mask"]
    plain = _quantize_once(bert["onnx"], tmp_path / "plain.onnx", STATIC_QDQ, calibration, names)
    assert unbounded_scales(plain)  # what ORT alone does: the mask bias calibrated into a ~1e36 scale
    notes: dict = {}
    fixed = quantize_int8(bert["onnx"], tmp_path / "fixed.onnx", STATIC_QDQ, calibration, names, notes=notes)
    assert notes["mask_path_float_nodes"] and unbounded_scales(fixed) == {}
    validation = bert["splits"]["validation"]
    _, plain_details = _agreement(bert["onnx"], plain, validation)
    fixed_agreement, fixed_details = _agreement(bert["onnx"], fixed, validation)
    assert fixed_agreement >= 0.98 and fixed_details["centred_cosine"] > 0.95
    assert fixed_details["centred_cosine"] > plain_details["centred_cosine"]
    assert plain_details["collapsed"] == 1.0  # the failure: the plain int8 model ignores its input


def _graph_with_a_baked_mask(path):
    """x -> MatMul -> Add(constant bias holding -3e38, a mask baked into the graph) -> Softmax -> MatMul."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, 6)).astype(np.float32), "w1")
    bias = numpy_helper.from_array(np.array([0, 0, 0, 0, -3e38, -3e38], np.float32), "bias")
    w2 = numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "bias"], ["scores"], name="add"),
        helper.make_node("Softmax", ["scores"], ["p"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["p", "w2"], ["y"], name="mm2"),
    ]
    graph = helper.make_graph(nodes, "baked", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w1, bias, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_unbounded_scale_without_a_mask_input_is_repaired(tmp_path):
    source = _graph_with_a_baked_mask(tmp_path / "baked.onnx")
    assert mask_path_nodes(source) == []  # no input named mask: the scale check must catch it
    x = np.random.default_rng(1).standard_normal((32, 4)).astype(np.float32)
    calibration = Split({"x": x})
    notes: dict = {}
    target = quantize_int8(source, tmp_path / "int8.onnx", STATIC_QDQ, calibration, ["x"], notes=notes)
    assert "scores" in notes["unbounded_scale_tensors"] and "add" in notes["unbounded_scale_float_nodes"]
    assert unbounded_scales(target) == {}
    expected, got = _runner(source)({"x": x})[0], _runner(target)({"x": x})[0]
    assert np.corrcoef(expected.ravel(), got.ravel())[0, 1] > 0.95


class _Offset(torch.nn.Module):
    """Outputs that vary by ~0.01 on an offset of 1000: an int8 output step (~4) erases the input."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        with torch.no_grad():
            self.linear.weight.mul_(0.01)
            self.linear.bias.fill_(1000.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_collapsed_static_int8_model_is_refused(tmp_path):
    torch.manual_seed(0)
    handle = load_model(_Offset().eval(), torch.randn(1, 4), name="offset")
    x = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    split = Split({handle.input_names[0]: x})
    task = Task("t", Accuracy(), {"calibration": split, "validation": split})
    technique = create_technique("quantize", mode="static", calibration_samples=32, latency_probe=lambda h: 1.0)
    with pytest.raises(QualityTargetNotMetError, match="barely vary with its input"):
        technique.apply(handle, Context(task=task, work_dir=tmp_path))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from compactai.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=900, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--no-preprocess"], []], ids=["unfused", "fused"])
def test_hf_classifier_dir_static_int8_with_labels_is_correct_or_refused(bert, tmp_path, extra):
    out = tmp_path / "out"
    result = _cli("quantize", str(bert["dir"]), "--data", str(bert["data"]), "--mode", "static", "--format", "qdq",
                  "--objective", "size", "--queries", "20", "--seconds", "0.1", "--out", str(out), "--json", *extra)
    assert result.returncode in (0, 3), result.stderr[-2000:]
    if result.returncode == 3:  # refused, with the reason on one line
        assert "refused" in result.stderr
        return
    data = json.loads(result.stdout)
    assert data["quality"]["metric"] == "accuracy" and data["quality"]["value"] >= 0.9  # labels kept working
    assert data["quantization"]["kept"] == "quantized" and data["quantization"]["output_spread_ratio"] > 0.5
    agreement, _ = _agreement(bert["onnx"], out / "model.onnx", bert["splits"]["validation"])
    assert agreement >= 0.98


@pytest.mark.slow
def test_gpt2_dir_quantizes_static_with_next_token_agreement(tmp_path):
    from tests.zoo.hf import gpt2_dir

    directory = gpt2_dir(tmp_path / "gpt2")
    data = token_npz(tmp_path / "data.npz", directory)  # padded with eos: GPT-2 has no pad token
    result = _cli("quantize", str(directory), "--data", str(data), "--mode", "static", "--format", "qdq",
                  "--objective", "size", "--queries", "20", "--seconds", "0.1", "--out", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    data_out = json.loads(result.stdout)
    quality = data_out["quality"]
    assert quality["metric"] == "next_token_agreement" and quality["baseline"] == 1.0
    assert quality["value"] >= 0.9 and 0.9 < quality["details"]["perplexity_ratio"] < 1.1
    assert any(n.endswith("attn/Softmax") for n in data_out["quantization"]["mask_path_float_nodes"])
