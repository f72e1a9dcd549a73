"""LiteRT and ExecuTorch: conversion in each runtime's own venv, parity in that runtime, running
and timing through the worker. The conversion tests run when the venv exists (build/litert-venv,
build/executorch-venv, or $COMPACTAI_LITERT_PYTHON / $COMPACTAI_EXECUTORCH_PYTHON; `make
runtime-venvs` creates them) and skip with that reason otherwise; the refusals run everywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from compactai import load_model
from compactai.errors import (
    InputSignatureError,
    MissingDependencyError,
    ParameterError,
    UnsupportedFormatError,
)
from compactai.measure import installed_runtimes, make_runner, measure_latency, runtime_plugin
from compactai.measure.device_int8 import INT8_MIN_AGREEMENT, calibration_rows


def needs(runtime: str) -> pytest.MarkDecorator:
    plugin = runtime_plugin(runtime)
    return pytest.mark.skipif(not plugin.available(), reason=f"no {runtime} venv: {plugin.install_line()}")


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", "from compactai.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=900, check=False, env={**os.environ, **(env or {})})


class CumProd(torch.nn.Module):
    """An op LiteRT's converter has no lowering for (aten.cumprod)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumprod(x, -1)


@pytest.mark.parametrize("runtime", ["litert", "executorch"])
def test_a_missing_venv_says_how_to_create_it(runtime, small_onnx, tmp_path, monkeypatch):
    plugin = runtime_plugin(runtime)
    monkeypatch.setenv(plugin.env_var, str(tmp_path / "nowhere" / "python"))
    assert not plugin.available()
    with pytest.raises(MissingDependencyError, match=f"make runtime-venvs .*build/{runtime}-venv.*{plugin.env_var}"):
        plugin.require()
    fmt = plugin.file_format
    result = run_cli("export", str(small_onnx), "--format", fmt, "-o", str(tmp_path / "o"),
                     env={plugin.env_var: str(tmp_path / "nowhere" / "python")})
    assert result.returncode == 2 and "make runtime-venvs" in result.stderr


def test_the_plugin_refuses_an_onnx_source_with_what_to_give_instead(small_onnx, tmp_path, monkeypatch):
    # any existing python passes the venv check; the refusal comes before it is used
    monkeypatch.setenv("COMPACTAI_LITERT_PYTHON", sys.executable)
    with pytest.raises(UnsupportedFormatError, match="takes a torch model"):
        runtime_plugin("litert").convert(load_model(small_onnx), tmp_path / "o")


@pytest.mark.slow  # the worker imports torch before it fails: ~30 s on 2 loaded cores
def test_a_converter_failure_is_one_line_with_the_converters_own_error(small_handle, tmp_path, monkeypatch):
    # compactai's own python has no litert_torch: the worker fails like a broken venv would
    monkeypatch.setenv("COMPACTAI_LITERT_PYTHON", sys.executable)
    with pytest.raises(UnsupportedFormatError, match="No module named 'litert_torch'") as info:
        runtime_plugin("litert").convert(small_handle, tmp_path / "o")
    assert "\n" not in str(info.value) and (tmp_path / "o" / "litert-convert.log").is_file()


def test_int8_without_calibration_data_says_what_to_pass(small_handle, small_onnx, tmp_path, monkeypatch):
    # any existing python passes the venv check; the refusal comes before the worker starts
    monkeypatch.setenv("COMPACTAI_EXECUTORCH_PYTHON", sys.executable)
    with pytest.raises(ParameterError, match=r"calibration split .* pass --data TASK\.npz .* or use --example NAME"):
        runtime_plugin("executorch").convert(small_handle, tmp_path / "o", quantize="int8")
    assert not (tmp_path / "o" / "model.pte").exists()
    result = run_cli("export", str(small_onnx), "--format", "pte", "--quantize", "int8", "-o", str(tmp_path / "c"),
                     env={"COMPACTAI_EXECUTORCH_PYTHON": sys.executable})
    assert result.returncode == 2 and "--data TASK.npz" in result.stderr, result.stderr[-2000:]


def test_int8_calibration_rows_fit_the_converted_sequence_length(minilm):
    handle, task = minilm.handle, minilm.task
    length = 12
    rows = calibration_rows(handle, task, dict.fromkeys(handle.input_names, (length,)), "pte")
    mask = rows["attention_mask"]
    assert set(rows) == set(handle.input_names) and 0 < len(mask) <= 64
    assert all(value.shape == (len(mask), length) for value in rows.values())
    # whole sentences only: a kept row never lost a token, the rest of the row is padding
    source_mask = task.split("calibration").inputs["attention_mask"]
    assert int(mask.sum()) == int(source_mask[source_mask.sum(axis=1) <= length][:64].sum())
    assert (rows["input_ids"][mask == 0] == 0).all()


def test_device_runtimes_are_not_measured_by_runtime_auto():
    assert not {"litert", "executorch"} & set(installed_runtimes())


@needs("litert")
@pytest.mark.slow
def test_litert_converts_runs_in_chunks_and_times_in_its_worker(small_handle, tmp_path):
    plugin = runtime_plugin("litert")
    converted = plugin.convert(small_handle, tmp_path / "o", batch=2)
    assert converted.path == tmp_path / "o" / "model.tflite" and converted.framework == "litert"
    parity = converted.metadata["parity"]
    assert parity["ok"] and max(parity["max_abs_diff"].values()) <= 1e-3
    runner = make_runner(converted, "litert", threads=1)
    images = np.random.default_rng(0).standard_normal((5, 1, 16, 16)).astype(np.float32)
    got = runner.run({"image": images})[0]  # 5 rows through a batch-2 model: chunks, the last one padded
    np.testing.assert_allclose(got, small_handle.run_torch({"image": images})[0], atol=1e-4)
    stats = measure_latency(runner, {"image": images[:2]}, min_queries=7, min_seconds=0.0, warmup=1)
    assert stats.queries >= 7 and len(stats.samples_ms) == stats.queries and stats.p50_ms > 0
    with pytest.raises(InputSignatureError, match="runs batches of 2"):
        measure_latency(runner, {"image": images[:1]}, min_queries=1, min_seconds=0.0, warmup=0)
    with pytest.raises(InputSignatureError, match="shape"):
        runner.run({"image": np.zeros((2, 1, 8, 8), np.float32)})
    runner.close()


@needs("litert")
@pytest.mark.slow
def test_litert_names_the_operator_it_cannot_lower(tmp_path):
    handle = load_model(CumProd().eval(), torch.rand(1, 4, 8), name="cumprod")
    with pytest.raises(UnsupportedFormatError, match=r"cannot lower 'cumprod': RuntimeError: Lowering not found: "
                                                     r"aten\.cumprod"):
        runtime_plugin("litert").convert(handle, tmp_path / "o")


@needs("executorch")
@pytest.mark.slow
def test_executorch_converts_with_a_dynamic_batch_through_the_cli(small_handle, tmp_path):
    program = tmp_path / "small.pt2"
    batch = {0: torch.export.Dim("batch", max=64)}
    torch.export.save(torch.export.export(small_handle.module, (torch.rand(2, 1, 16, 16),), dynamic_shapes=(batch,)),
                      str(program))
    result = run_cli("export", str(program), "--format", "pte", "-o", str(tmp_path / "o"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout)
    assert data["runtime"] == "executorch" and Path(data["model"]).name == "model.pte"
    assert data["parity"]["ok"] and data["conversion"]["batch"] == "1..64"
    assert data["size_bytes"] == Path(data["model"]).stat().st_size


@needs("litert")
@pytest.mark.slow
def test_an_onnx_model_exports_to_tflite_through_onnx2torch(small_onnx, tmp_path):
    result = run_cli("export", str(small_onnx), "--format", "tflite", "--batch", "2", "-o", str(tmp_path / "o"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout)
    assert data["parity"]["ok"] and data["conversion"]["batch"] == 2 and data["runtime"] == "litert"


def test_the_batch_flag_is_for_device_formats_only(small_onnx, tmp_path):
    result = run_cli("export", str(small_onnx), "--format", "openvino", "--batch", "4", "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and "--batch applies to --format tflite or pte" in result.stderr


def test_a_converter_that_overruns_its_time_is_stopped(small_handle, tmp_path, monkeypatch):
    monkeypatch.setenv("COMPACTAI_LITERT_PYTHON", sys.executable)
    monkeypatch.setenv("COMPACTAI_CONVERT_TIMEOUT", "0.001")  # no python starts, let alone converts, in 1 ms
    with pytest.raises(RuntimeError, match=r"did not finish within 0\.001 s; raise COMPACTAI_CONVERT_TIMEOUT"):
        runtime_plugin("litert").convert(small_handle, tmp_path / "o")


@needs("executorch")
@pytest.mark.slow
def test_executorch_with_a_static_batch_runs_other_sizes_in_padded_chunks(small_handle, tmp_path):
    converted = runtime_plugin("executorch").convert(small_handle, tmp_path / "o", batch=3)
    assert converted.metadata["executorch"]["batch"] == 3 and converted.metadata["parity"]["ok"]
    runner = make_runner(converted, "executorch", threads=1)
    images = np.random.default_rng(1).standard_normal((5, 1, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(runner.run({"image": images})[0], small_handle.run_torch({"image": images})[0], atol=1e-4)
    runner.close()


@pytest.mark.parametrize("fmt", [pytest.param("pte", marks=needs("executorch")),
                                 pytest.param("tflite", marks=needs("litert"))])
@pytest.mark.slow  # two conversions in the runtime's venv: a few minutes on 2 loaded cores
def test_digits_int8_converts_runs_in_its_runtime_within_tolerance_and_is_smaller(fmt, digits, tmp_path):
    result = run_cli("export", "--example", "digits", "--format", fmt, "--quantize", "int8", "-o",
                     str(tmp_path / "int8"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout)
    parity, conversion = data["parity"], data["conversion"]
    assert conversion["precision"] == "int8" and conversion["calibration_rows"] == 64
    assert parity["ok"] and parity["mean_cosine"]["logits"] >= 0.99 and parity["samples"] == 64
    assert parity["argmax_agreement"]["logits"] >= INT8_MIN_AGREEMENT
    # the test accuracy of the int8 file in its own runtime, next to the float source's
    assert parity["quality"]["metric"] == "accuracy" and parity["quality"]["value"] >= parity["quality"]["source"] - 0.02
    plugin = runtime_plugin(data["runtime"])
    fp32 = plugin.convert(digits.handle, tmp_path / "fp32", task=digits.task)
    assert data["size_bytes"] < 0.5 * plugin.model_size(fp32)
