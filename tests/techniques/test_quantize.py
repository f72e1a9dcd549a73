"""The quantize family on small real models: every mode, the latency guard rail (with an
injected probe, so the decision is deterministic), the 4x size of int8, the sensitivity
analysis and auto search, QAT, and bad input through the API and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compactai import Context, load_model
from compactai.errors import ParameterError, TechniqueError
from compactai.measure import make_runner
from compactai.tasks import Accuracy, Split, Task
from compactai.techniques import create_technique
from compactai.techniques.quantize import QualityTargetNotMetError


class TinyEncoder(nn.Module):
    """Transformer-ish: token MLP blocks with residuals and LayerNorm (MatMuls with weights), then a classifier."""

    def __init__(self, dim: int = 32, hidden: int = 64, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(16, dim)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            for _ in range(2)
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h.mean(dim=1))


def make_task(handle, inputs: np.ndarray, name: str) -> Task:
    """Labels are the float model's own predictions, so the float accuracy is 1.0 on every split."""
    labels = handle.run_torch({handle.input_names[0]: inputs})[0].argmax(axis=-1)
    cut = np.cumsum([len(inputs) // 4] * 3)
    parts = np.split(np.arange(len(inputs)), cut)
    splits = {
        split: Split({handle.input_names[0]: inputs[idx]}, labels[idx])
        for split, idx in zip(("train", "calibration", "validation", "test"), parts)
    }
    task = Task(name, Accuracy(), splits, batch_size=64)
    task.baseline = 1.0
    return task


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyEncoder().eval()
    inputs = np.random.default_rng(0).standard_normal((256, 8, 16)).astype(np.float32)
    handle = load_model(model, torch.from_numpy(inputs[:1]), name="tiny-encoder", output_names=["logits"])
    handle.kind = "mlp"
    return handle, make_task(handle, inputs, "tiny")


@pytest.fixture(scope="module")
def cnn_task():
    from tests.conftest import SmallResidualCNN

    torch.manual_seed(0)
    model = SmallResidualCNN().eval()
    images = np.random.default_rng(1).standard_normal((128, 1, 16, 16)).astype(np.float32)
    handle = load_model(model, torch.from_numpy(images[:1]), name="small-cnn", output_names=["logits"])
    return handle, make_task(handle, images, "small-cnn")


def quantized_wins(handle) -> float:
    """A latency probe that says any file other than the float export is twice as fast."""
    return 1.0 if handle.path.name == "float.onnx" else 0.5


def context(task, tmp_path: Path) -> Context:
    return Context(task=task, work_dir=tmp_path / "work")


def agreement(a, b, feeds) -> float:
    """Fraction of rows where two models predict the same class."""
    out_a, out_b = make_runner(a).run(feeds)[0], make_runner(b).run(feeds)[0]
    return float((out_a.argmax(-1) == out_b.argmax(-1)).mean())


@pytest.mark.parametrize(
    "params",
    [
        {"mode": "dynamic"},
        {"mode": "static", "format": "qoperator", "calibration": "minmax"},
        {"mode": "static", "format": "qdq", "calibration": "entropy", "per_channel": False},
        {"mode": "static", "format": "qdq", "calibration": "percentile", "reduce_range": True},
    ],
)
def test_int8_modes_on_a_transformer_like_mlp(tiny, tmp_path, params):
    handle, task = tiny
    fingerprint = handle.fingerprint()
    result = create_technique(
        "quantize", calibration_samples=16, latency_probe=quantized_wins, **params
    ).apply(handle, context(task, tmp_path))
    assert handle.fingerprint() == fingerprint
    assert result.framework == "onnx" and Path(result.path).is_relative_to(tmp_path / "work")
    ops = {n.op_type for n in onnx.load(str(result.path)).graph.node}
    expected = {
        "dynamic": "MatMulInteger",
        "static": "QLinearMatMul" if params.get("format") == "qoperator" else "QuantizeLinear",
    }
    assert expected[params["mode"]] in ops | {"DynamicQuantizeMatMul"} and (
        params["mode"] != "dynamic" or ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    )
    decisions = result.metadata["history"][-1]["decisions"]
    assert decisions["kept"] == "quantized" and decisions["config"]["mode"] == params["mode"]
    feeds = {"x": task.split("test").inputs["x"]}
    assert agreement(handle.to_onnx(), result, feeds) >= 0.85


@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
def test_weight_type_sets_the_stored_weights_and_uint8_keeps_all_8_bits(tiny, tmp_path, weight_type):
    handle, task = tiny
    result = create_technique(
        "quantize", mode="dynamic", weight_type=weight_type, latency_probe=quantized_wins
    ).apply(handle, context(task, tmp_path))
    graph = onnx.load(str(result.path)).graph
    weights = {i.name: i for i in graph.initializer}
    stored = {
        onnx.helper.tensor_dtype_to_np_dtype(weights[n.input[1]].data_type)
        for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] in weights
    }
    assert stored == {np.dtype(weight_type)}
    config = result.metadata["history"][-1]["decisions"]["config"]
    assert config["weight_type"] == weight_type
    if weight_type == "uint8":  # u8u8 kernels do not saturate: "auto" never drops the 8th bit
        assert config["reduce_range"] is False
    feeds = {"x": task.split("test").inputs["x"]}
    assert agreement(handle.to_onnx(), result, feeds) >= 0.85


def test_reduce_range_auto_drops_a_bit_only_from_8_bit_int8_weights(monkeypatch):
    from compactai.techniques.quantize import _common

    monkeypatch.setattr(_common, "int8_kernels_saturate", lambda: True)
    assert _common.resolve_reduce_range("auto") is True
    assert _common.resolve_reduce_range("auto", weight_bits=4) is False  # int4 is dequantized: no saturation
    assert _common.resolve_reduce_range("auto", weight_type="uint8") is False
    assert _common.resolve_reduce_range(True, weight_bits=4) is True  # asked for: kept
    monkeypatch.setattr(_common, "int8_kernels_saturate", lambda: False)
    assert _common.resolve_reduce_range("auto") is False


@pytest.mark.parametrize("saturate", [True, False])
def test_auto_tries_uint8_weights_exactly_where_int8_kernels_saturate(monkeypatch, saturate):
    from compactai.techniques.quantize import technique
    from compactai.techniques.quantize.ort_ptq import Int8Config

    monkeypatch.setattr(technique, "int8_kernels_saturate", lambda: saturate)
    configs = technique.default_configs("transformer", True, Int8Config(reduce_range=True))
    uint8 = [c for c in configs if c.weight_type == "uint8"]
    assert len(uint8) == (1 if saturate else 0)
    assert all(c.mode == "dynamic" and not c.reduce_range and c.per_channel for c in uint8)
    assert configs[0].weight_type == "int8"  # the ranking configuration stays the int8 one


def test_guard_rail_keeps_float_when_int8_is_slower(tiny, tmp_path):
    handle, task = tiny
    def slower(h):
        return 1.0 if h.path.name == "float.onnx" else 2.0
    result = create_technique("quantize", mode="dynamic", latency_probe=slower).apply(
        handle, context(task, tmp_path)
    )
    decisions = result.metadata["history"][-1]["decisions"]
    assert decisions["kept"] == "float" and "not faster" in decisions["note"]
    assert result.path.name == "float.onnx"
    assert not any(
        n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
        for n in onnx.load(str(result.path)).graph.node
    )
    sized = create_technique("quantize", mode="dynamic", latency_probe=slower, objective="size").apply(
        handle, context(task, tmp_path)
    )
    assert sized.metadata["history"][-1]["decisions"]["kept"] == "quantized"
    assert sized.path.name != "float.onnx"


def ort_runs_matmul(elem_type: int) -> bool:
    """Whether ONNX Runtime's CPU provider here has MatMul and Add kernels for this float type (asked
    of ORT directly, on a two-node graph), so the test knows which answer the technique owes."""
    import onnxruntime as ort
    from onnx import helper

    x = helper.make_tensor_value_info("x", elem_type, [2, 2])
    y = helper.make_tensor_value_info("y", elem_type, [2, 2])
    nodes = [helper.make_node("MatMul", ["x", "x"], ["m"]), helper.make_node("Add", ["m", "x"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "probe", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 (any refusal means: no kernel for this type here)
        return False
    return True


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_fp16_and_bf16_run_when_ort_can_and_say_not_offered_otherwise(tiny, tmp_path, mode):
    handle, task = tiny
    elem_type = onnx.TensorProto.FLOAT16 if mode == "fp16" else onnx.TensorProto.BFLOAT16
    technique = create_technique("quantize", mode=mode, objective="size")
    if not ort_runs_matmul(elem_type):
        with pytest.raises(TechniqueError, match=f"{mode} is not offered"):
            technique.apply(handle, context(task, tmp_path))
        return
    result = technique.apply(handle, context(task, tmp_path))
    assert elem_type in {i.data_type for i in onnx.load(str(result.path)).graph.initializer}
    assert agreement(handle.to_onnx(), result, {"x": task.split("test").inputs["x"][:32]}) >= 0.9


def test_int4_weight_only_on_matmuls_and_a_clear_error_without_them(tiny, small_handle, tmp_path):
    handle, task = tiny
    result = create_technique("quantize", mode="int4", block_size=16, objective="size").apply(
        handle, context(task, tmp_path)
    )
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(result.path)).graph.node) >= 4
    assert result.metadata["history"][-1]["decisions"]["int4_matmuls"] >= 4
    with pytest.raises(TechniqueError, match="no MatMul"):
        create_technique("quantize", mode="int4", preprocess=False).apply(
            small_handle, Context(task=None, work_dir=tmp_path)
        )


def test_static_int8_digits_is_4x_smaller_and_keeps_accuracy(digits, tmp_path):
    result = create_technique("quantize", mode="static", calibration_samples=16, objective="size").apply(
        digits.handle, context(digits.task, tmp_path)
    )
    decisions = result.metadata["history"][-1]["decisions"]
    assert decisions["size_ratio"] >= 3.5
    assert decisions["float_size_bytes"] / Path(result.path).stat().st_size >= 3.5
    accuracy = digits.task.evaluate(make_runner(result)).value
    assert digits.task.baseline - accuracy <= 0.01


def test_auto_meets_the_target_with_sensitivity_table_and_plot(tiny, tmp_path):
    handle, task = tiny
    result = create_technique(
        "quantize",
        mode="auto",
        max_drop=0.0,
        latency_probe=quantized_wins,
        sensitivity_samples=32,
        configs=[{"mode": "dynamic", "per_channel": False, "reduce_range": True}, {"mode": "static"}],
    ).apply(handle, context(task, tmp_path))
    summary = result.metadata["quantize"]
    sensitivity = summary["sensitivity"]
    assert len(sensitivity["ops"]) == 6  # inp, 2 x 2 block linears, head
    assert all(
        op["quality_alone_quantized"] is not None and op["quality_alone_float"] is not None
        for op in sensitivity["ops"]
    )
    assert Path(summary["sensitivity_plot"]).stat().st_size > 1000
    search = summary["search"]
    assert search["chosen"]["meets_target"] and search["chosen"]["quality"] >= 1.0
    assert all(c["meets_target"] for c in search["candidates"])
    # the injected probe times every candidate alike, so the tie goes to the fewest ops left in float
    assert search["chosen"] in search["candidates"]
    assert search["chosen"]["float_ops"] == min(c["float_ops"] for c in search["candidates"])
    assert len(summary["float_ops"]) == search["chosen"]["float_ops"]
    ranking = sorted(
        sensitivity["ops"],
        key=lambda op: (-(op["gain_alone_float"] + op["loss_alone_quantized"]), -op["loss_alone_quantized"]),
    )
    assert set(summary["float_ops"]) == {op["node"] for op in ranking[: len(summary["float_ops"])]}


def test_auto_picks_on_quality_among_equally_fast_candidates_and_on_speed_otherwise(tmp_path):
    from compactai.techniques.quantize.auto import Trial, pick
    from compactai.techniques.quantize.ort_ptq import Int8Config

    def trial(floats: int, quality: float, ms: float) -> Trial:
        return Trial(Int8Config(), floats, quality, {}, tmp_path / "m.onnx", True, ms)

    int8, uint8 = trial(0, 0.9942, 22.68), trial(0, 0.9961, 23.62)  # 4% apart: the same speed
    assert pick([int8, uint8]) is uint8
    fewer_floats = trial(0, 0.9905, 23.0)
    assert pick([trial(2, 0.999, 22.5), fewer_floats]) is fewer_floats
    faster = trial(0, 0.9905, 10.0)
    assert pick([uint8, faster]) is faster


def test_auto_unreachable_target_raises_with_best_model_written(tiny, tmp_path):
    handle, task = tiny
    technique = create_technique(
        "quantize",
        mode="auto",
        min_quality=1.5,
        sensitivity="none",
        latency_probe=quantized_wins,
        configs=[{"mode": "dynamic"}],
    )
    with pytest.raises(QualityTargetNotMetError, match="best reached") as info:
        technique.apply(handle, context(task, tmp_path))
    assert info.value.exit_code == 3
    assert info.value.best is not None and Path(info.value.best.path).exists()
    assert 0.0 < info.value.quality <= 1.0
    make_runner(info.value.best).run({"x": task.split("test").inputs["x"][:2]})


def test_bad_parameters_fail_with_one_clear_line(tiny, tmp_path):
    handle, task = tiny
    with pytest.raises(ParameterError, match="'mode' parameter of Quantize must be one of dynamic, static"):
        create_technique("quantize", mode="int3").apply(handle, context(task, tmp_path))
    with pytest.raises(ParameterError, match="max_drop"):
        create_technique("quantize", mode="auto", max_drop=-1).validate()
    with pytest.raises(ParameterError, match="nodes_to_exclude"):
        create_technique("quantize", nodes_to_exclude="conv1").validate()
    with pytest.raises(ParameterError, match="needs a task"):
        create_technique("quantize", mode="auto").apply(handle, Context(task=None, work_dir=tmp_path))


def test_qat_returns_an_int8_onnx_model_that_runs(cnn_task, tmp_path):
    handle, task = cnn_task
    fingerprint = handle.fingerprint()
    result = create_technique("qat", epochs=1, max_batches=2, calibration_samples=8).apply(
        handle, context(task, tmp_path)
    )
    assert handle.fingerprint() == fingerprint
    decisions = result.metadata["history"][-1]["decisions"]
    assert decisions["batchnorm_folded"] and decisions["fake_quant_layers"] == 4
    assert decisions["float_size_bytes"] > decisions["quantized_size_bytes"]
    assert any(n.op_type == "QLinearConv" for n in onnx.load(str(result.path)).graph.node)
    assert agreement(handle.to_onnx(), result, {"image": task.split("test").inputs["image"]}) >= 0.8


def write_npz(task: Task, path: Path) -> Path:
    arrays = {}
    for split in ("train", "calibration", "validation", "test"):
        part = task.split(split)
        for name, value in part.inputs.items():
            arrays[f"{split}/{name}"] = value
        arrays[f"{split}/labels"] = part.labels
    np.savez(path, **arrays)
    return path


CLI_FAST = ["--queries", "5", "--seconds", "0.01"]


def test_cli_static_writes_model_and_results(tiny, tmp_path, capfd):
    from compactai.cli import main

    handle, task = tiny
    model = handle.to_onnx(tmp_path / "tiny.onnx").path
    data = write_npz(task, tmp_path / "tiny.npz")
    out = tmp_path / "out"
    code = main(
        [
            "quantize",
            str(model),
            "--data",
            str(data),
            "--mode",
            "static",
            "--objective",
            "size",
            "--calibration-samples",
            "16",
            "-o",
            str(out),
            "--json",
            *CLI_FAST,
        ]
    )
    captured = capfd.readouterr()
    assert code == 0, captured.err[-2000:]
    printed = json.loads(captured.out.strip().splitlines()[-1])
    assert printed["status"] == "ok" and printed["quantization"]["kept"] == "quantized"
    assert (out / "model.onnx").exists()
    written = json.loads((out / "results.json").read_text())
    assert written["command"] == "quantize" and written["quality"]["metric"] == "accuracy"
    assert written["lineage"][-1]["technique"] == "quantize"


def test_cli_unknown_mode_and_unmet_target(tiny, tmp_path, capfd):
    from compactai.cli import main

    handle, task = tiny
    model = handle.to_onnx(tmp_path / "tiny.onnx").path
    data = write_npz(task, tmp_path / "tiny.npz")
    assert main(["quantize", str(model), "--data", str(data), "--mode", "int3"]) == 2
    err = capfd.readouterr().err
    assert "Unknown quantization mode 'int3'" in err and "dynamic, static, fp16, bf16, int4, qat, auto" in err
    out = tmp_path / "unmet"
    code = main(
        [
            "quantize",
            str(model),
            "--data",
            str(data),
            "--mode",
            "auto",
            "--min-quality",
            "1.5",
            "--sensitivity-samples",
            "16",
            "-o",
            str(out),
            *CLI_FAST,
        ]
    )
    assert code == 3
    err = capfd.readouterr().err
    assert "best reached" in err
    assert (out / "model.onnx").exists()
    assert json.loads((out / "results.json").read_text())["status"] == "target_not_met"


def test_cli_qat_on_a_flattened_pt2_says_what_to_do(tiny, tmp_path, capfd):
    from compactai.cli import main

    handle, task = tiny
    model_path = tmp_path / "tiny.pt2"
    example = (torch.from_numpy(task.split("test").inputs["x"][:2]),)
    batch = {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    torch.export.save(torch.export.export(handle.module, example, dynamic_shapes=batch), model_path)
    data = write_npz(task, tmp_path / "tiny.npz")
    code = main(
        [
            "quantize",
            str(model_path),
            "--data",
            str(data),
            "--mode",
            "qat",
            "--epochs",
            "1",
            "--max-batches",
            "2",
            "-o",
            str(tmp_path / "qat"),
            *CLI_FAST,
        ]
    )
    assert code == 2
    assert "no Conv or Linear module" in capfd.readouterr().err
