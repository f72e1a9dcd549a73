"""What makes int8 keep a transformer encoder's quality: outlier-channel scaling (the model's
function unchanged, the int8 error smaller), the residual Add written as Sum, and exporting
Hugging Face attention in the form ONNX Runtime fuses; on a toy graph and on MiniLM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compactai import Context, load_model
from compactai.measure import make_runner
from compactai.measure.environment import int8_kernels_saturate
from compactai.tasks import Split
from compactai.techniques import create_technique
from compactai.techniques.quantize.equalize import residual_adds_as_sum, scale_outlier_channels
from compactai.techniques.quantize.ort_ptq import Int8Config, quantize_int8


class Block(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear with a residual, then a final LayerNorm."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.out = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + self.down(torch.nn.functional.gelu(self.up(self.norm(x)))))


def outlier_inputs(rows: int, seed: int) -> np.ndarray:
    """Token sequences whose first token carries a few huge channels, like BERT's [CLS]."""
    data = np.random.default_rng(seed).standard_normal((rows, 6, 32)).astype(np.float32)
    data[:, 0, :3] *= 60.0
    return data


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    torch.manual_seed(0)
    model = Block().eval()
    with torch.no_grad():  # a LayerNorm gain that keeps the outlier channels large after normalising
        model.norm.weight[:3] = 20.0
    handle = load_model(model, torch.from_numpy(outlier_inputs(1, 0)), name="block", output_names=["y"])
    return handle.to_onnx(tmp_path_factory.mktemp("block") / "float.onnx")


def run(path: Path, handle, x: np.ndarray) -> np.ndarray:
    return make_runner(handle.as_onnx(path)).run({handle.input_names[0]: x})[0]


def test_outlier_scaling_keeps_the_function_and_cuts_the_int8_error(block, tmp_path):
    calibration = Split({block.input_names[0]: outlier_inputs(32, 1)})
    scaled = tmp_path / "scaled.onnx"
    info = scale_outlier_channels(Path(block.path), scaled, calibration, block.input_names, threshold=3.0)
    assert info["scaled_inputs"] >= 1 and info["scaled_channels"] >= 3
    x = outlier_inputs(16, 2)
    reference = run(Path(block.path), block, x)
    np.testing.assert_allclose(run(scaled, block, x), reference, rtol=1e-4, atol=1e-4)
    errors = {}
    for name, source in (("plain", Path(block.path)), ("scaled", scaled)):
        target = tmp_path / f"{name}.int8.onnx"
        # 7-bit weights where this CPU's u8s8 kernels saturate (as the quantize technique does by default)
        config = Int8Config(mode="dynamic", per_channel=True, reduce_range=int8_kernels_saturate())
        quantize_int8(source, target, config)
        errors[name] = float(np.abs(run(target, block, x) - reference).mean())
    assert errors["scaled"] < 0.7 * errors["plain"], errors


def test_nothing_to_scale_leaves_the_model_as_it_was(block, tmp_path):
    calibration = Split({block.input_names[0]: np.random.default_rng(3).standard_normal((16, 6, 32)).astype(np.float32)})
    info = scale_outlier_channels(Path(block.path), tmp_path / "same.onnx", calibration, block.input_names, threshold=1000.0)
    assert info["scaled_inputs"] == 0


def test_residual_add_before_layernorm_is_written_as_sum(block, tmp_path):
    path = tmp_path / "sum.onnx"
    path.write_bytes(Path(block.path).read_bytes())
    assert residual_adds_as_sum(path) == 1
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "Sum" in ops
    x = outlier_inputs(4, 4)
    np.testing.assert_allclose(run(path, block, x), run(Path(block.path), block, x), rtol=1e-5, atol=1e-5)


def test_minilm_int8_fuses_attention_and_outlier_scaling_lifts_fidelity(minilm, tmp_path):
    handle, task = minilm.handle, minilm.task
    config = handle.module.encoder.config
    assert config._attn_implementation == "sdpa"
    results = {}
    for scaling in ("on", "off"):
        context = Context(task=task, work_dir=tmp_path / scaling)
        quantized = create_technique(
            "quantize", mode="dynamic", objective="size", outlier_scaling=scaling
        ).apply(handle, context)
        decisions = quantized.metadata["quantize"]
        assert decisions["preprocess"].startswith("attention fusion (6 layers)")
        # symbolic shape inference gives up on this graph; the rest of ORT's pre-processing still ran
        assert "attention fusion (6 layers), shape inference + ORT optimization" in decisions["preprocess"]
        assert decisions["size_ratio"] > 3.5
        results[scaling] = task.evaluate(make_runner(quantized), split="validation").details
    assert config._attn_implementation == "sdpa"  # the torch model keeps its own attention
    assert results["on"]["cosine_min"] > results["off"]["cosine_min"] + 0.002, results
    assert results["on"]["cosine_mean"] >= 0.996, results


def test_head_pruned_encoder_still_gets_fused_attention(tmp_path):
    """Layers that kept different numbers of heads: ORT's fusion would fall back to one model-wide
    count and fuse nothing; the head counts spelled out in the graph let every layer fuse."""
    from transformers import BertConfig, BertModel

    from compactai.models.load import SentenceEncoder
    from compactai.tasks import EmbeddingFidelity, Task
    from compactai.techniques.prune.engine import attention_modules

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (48, 12))
    mask = (np.arange(12)[None, :] < rng.integers(4, 13, 48)[:, None]).astype(np.int64)
    data = Split({"input_ids": ids * mask, "attention_mask": mask})
    model = BertModel(config).eval()
    with torch.no_grad():  # trained-looking biases: all-zero ones would be shared by the exporter
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.02)
    handle = load_model(SentenceEncoder(model).eval(), {k: v[:2] for k, v in data.inputs.items()}, name="tiny-bert")
    task = Task("tiny", EmbeddingFidelity(handle.run_torch), {"calibration": data, "validation": data},
                eval_split="validation")
    pruned = create_technique("structured_prune", ratio=0.25, target="channels", scope="heads", criterion="l2",
                              ranking="global", protect_first=False).apply(handle, Context(task=task, work_dir=tmp_path))
    heads = [a.num_attention_heads for a in attention_modules(pruned.module).values()]
    assert heads != [4, 4], heads
    quantized = create_technique("quantize", mode="dynamic", outlier_scaling="off").apply(
        pruned, Context(task=task, work_dir=tmp_path / "q"))
    assert quantized.metadata["quantize"]["preprocess"].startswith("attention fusion (2 layers)")
    graph = onnx.load(str(quantized.path)).graph
    assert sum(n.op_type == "QAttention" for n in graph.node) == 2
    assert task.evaluate(make_runner(quantized)).details["cosine_min"] > 0.99


def test_dynamic_fake_quant_is_what_ort_dynamic_quantize_linear_computes():
    """QAT for dynamic int8 trains through the rounding ORT applies at run time: the input's own
    uint8 range (DynamicQuantizeLinear, then back to float), with a straight-through gradient."""
    from onnx import TensorProto, helper

    from compactai.techniques.quantize.qat import dynamic_fake_quant

    x = outlier_inputs(2, 3)
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))])
    import onnxruntime as ort

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    tensor = torch.from_numpy(x).requires_grad_(True)
    got = dynamic_fake_quant(tensor)
    step = float(x.max() - min(x.min(), 0.0)) / 255.0
    assert np.abs(got.detach().numpy() - expected).max() <= 1e-3 * step  # the same grid and rounding
    assert np.abs(got.detach().numpy() - x).max() > 0.1 * step  # and it did round
    got.sum().backward()
    assert torch.equal(tensor.grad, torch.ones_like(tensor))


def test_dynamic_qat_fine_tunes_and_keeps_the_dynamic_int8_graph(tmp_path):
    """QAT with activations='auto' on a transformer trains for dynamic int8 and ends as plain dynamic
    int8 of the fine-tuned weights: the same ops as dynamic int8 of the original, so the same speed."""
    from transformers import BertConfig, BertModel

    from compactai.models.load import SentenceEncoder
    from compactai.tasks import EmbeddingFidelity, Task

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 100, (64, 12))
    data = Split({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    handle = load_model(SentenceEncoder(BertModel(config).eval()).eval(), {k: v[:2] for k, v in data.inputs.items()},
                        name="tiny-bert")
    task = Task("tiny", EmbeddingFidelity(handle.run_torch), {"train": data, "calibration": data, "validation": data},
                eval_split="validation")
    plain = create_technique("quantize", mode="dynamic").apply(handle, Context(task=task, work_dir=tmp_path / "ptq"))
    qat = create_technique("qat", epochs=2, lr=1e-4, batch_size=16).apply(
        handle, Context(task=task, work_dir=tmp_path / "qat"))
    decisions = qat.metadata["quantize"]
    assert decisions["mode"] == "qat" and decisions["activations"] == "dynamic" and decisions["epochs_done"] == 2
    assert decisions["fake_quant_layers"] == 2 * 6 + 1  # q, k, v, out, ffn in/out per layer, and the pooler

    def op_types(model_handle) -> list[str]:
        return sorted(n.op_type for n in onnx.load(str(model_handle.path), load_external_data=False).graph.node)

    assert op_types(qat) == op_types(plain)
    assert any(op in op_types(qat) for op in ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention"))
    quality = task.evaluate(make_runner(qat), split="validation").details
    assert quality["cosine_mean"] > 0.95, quality  # judged against the original float model
