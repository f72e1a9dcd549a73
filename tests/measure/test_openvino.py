"""The runtime plug-ins, and OpenVINO's: running ONNX and IR, conversion with parity, NNCF int8,
the `export` command. OpenVINO tests skip with the reason when the extra is not installed."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compactai.errors import (
    BudgetNotMetError,
    MissingDependencyError,
    ParityError,
    UnknownNameError,
    UnsupportedFormatError,
)
from compactai.measure import (
    RUNTIME_PLUGINS,
    MeasureConfig,
    RuntimePlugin,
    installed_runtimes,
    make_runner,
    measure,
    runtime_plugin,
    size_on_disk,
)
from compactai.measure.openvino import check_converted, parity_figures

needs_openvino = pytest.mark.skipif(not runtime_plugin("openvino").available(),
                                    reason="OpenVINO is not installed: pip install -c constraints.txt 'compactai[openvino]'")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from compactai.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=900, check=False)


def test_every_runtime_is_a_registered_plugin():
    assert sorted(RUNTIME_PLUGINS.names()) == ["executorch", "litert", "onnxruntime", "openvino", "torch"]
    assert "onnxruntime" in installed_runtimes() and "torch" not in installed_runtimes()
    with pytest.raises(UnknownNameError, match="openvino"):
        runtime_plugin("tensorrt")


def test_missing_extra_names_the_pip_line(small_handle):
    class Absent(RuntimePlugin):
        name = "absent-runtime"
        modules = ("compactai_no_such_runtime_module",)
        extra = "absent"

    RUNTIME_PLUGINS.register(Absent.name, Absent)
    try:
        assert Absent.name not in installed_runtimes()
        with pytest.raises(MissingDependencyError, match=r"pip install -c constraints.txt 'compactai\[absent\]'"):
            make_runner(small_handle, Absent.name)
    finally:
        RUNTIME_PLUGINS.unregister(Absent.name)


def test_parity_figures_catch_a_changed_output():
    expected = [np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)]
    same = parity_figures(expected, [expected[0].copy()], ["y"])
    assert same["max_abs_diff"]["y"] == 0.0 and same["mean_cosine"]["y"] == pytest.approx(1.0)
    flipped = parity_figures(expected, [-expected[0]], ["y"])
    assert flipped["mean_cosine"]["y"] == pytest.approx(-1.0)
    # padded positions (mask 0) of a sequence output do not count
    tokens = np.ones((1, 2, 3), np.float32)
    padded_off = tokens.copy()
    padded_off[0, 1] = -5.0
    masked = parity_figures([tokens], [padded_off], ["h"], np.array([[1, 0]]))
    assert masked["max_abs_diff"]["h"] == 0.0
    assert parity_figures([tokens], [padded_off], ["h"])["max_abs_diff"]["h"] == 6.0
    with pytest.raises(ParityError, match="shape"):
        parity_figures(expected, [expected[0][:1]], ["y"])


@needs_openvino
def test_openvino_runs_onnx_like_onnxruntime(small_handle):
    images = np.random.default_rng(1).standard_normal((5, 1, 16, 16)).astype(np.float32)
    feeds = {small_handle.input_names[0]: images}
    runner = make_runner(small_handle, "openvino", threads=1)
    got = runner.run(feeds)
    want = make_runner(small_handle, "onnxruntime", threads=1).run(feeds)
    assert got[0].shape == (5, 10)
    assert np.max(np.abs(got[0] - want[0])) < 1e-4
    assert runner.thread_settings()["inference_num_threads"] == 1


@needs_openvino
def test_convert_to_ir_keeps_parity_and_is_measured_in_openvino(small_handle, tmp_path):
    converted = runtime_plugin("openvino").convert(small_handle, tmp_path / "ir")
    assert converted.framework == "openvino" and converted.path == tmp_path / "ir" / "model.xml"
    assert (tmp_path / "ir" / "model.bin").stat().st_size > 0
    parity = converted.metadata["parity"]
    assert parity["ok"] and max(parity["max_abs_diff"].values()) <= parity["tolerance"]["max_abs_diff"]
    config = MeasureConfig(min_queries=10, min_seconds=0.05, warmup=2, throughput_batch=4, throughput_min_batches=2,
                           memory=True, energy=False)
    m = measure(converted, runtime="openvino", config=config)
    assert m.runtime == "openvino" and m.size_bytes == size_on_disk(converted.path)
    assert m.size_bytes > (tmp_path / "ir" / "model.xml").stat().st_size  # the .bin counts
    assert m.params == converted.metadata["params"] and m.params > 0
    assert m.runtime_settings["inference_precision"] == "f32"
    # peak memory in a subprocess that loads OpenVINO and compiles the IR with the runner's settings
    assert not any("peak memory not measured" in note for note in m.notes)
    assert m.peak_memory_mb is not None and m.model_memory_mb is not None
    assert m.peak_memory_mb > m.model_memory_mb > 0
    with pytest.raises(UnsupportedFormatError, match="no ONNX form"):
        converted.to_onnx()
    with pytest.raises(UnsupportedFormatError):
        make_runner(converted, "onnxruntime")


@needs_openvino
def test_check_converted_refuses_a_different_model(small_handle, tmp_path):
    import torch

    converted = runtime_plugin("openvino").convert(small_handle, tmp_path / "ir")
    torch.manual_seed(1)
    changed = small_handle.derive(module=type(small_handle.module)().eval())  # other random weights
    with pytest.raises(ParityError, match="diverged"):
        check_converted(changed, converted)


@needs_openvino
@pytest.mark.slow
def test_nncf_int8_of_digits_keeps_the_quality_floor(digits, tmp_path):
    handle, task = digits.handle, digits.task
    floor = task.baseline - 0.02
    converted = runtime_plugin("openvino").convert(handle, tmp_path / "int8", quantize="int8", task=task,
                                                   min_quality=floor)
    details = converted.metadata["openvino"]
    assert details["precision"] == "int8"
    assert max(details.get("validation_quality", 0.0), details.get("validation_quality_ptq", 0.0)) >= floor
    assert converted.metadata["parity"]["ok"]
    quality = task.evaluate(make_runner(converted, "openvino"))
    assert quality.value >= floor
    # int8 weights: well under half the fp32 ONNX file
    assert size_on_disk(converted.path) < 0.5 * size_on_disk(handle.to_onnx().path)


@needs_openvino
@pytest.mark.slow
def test_accuracy_aware_int8_stops_at_its_revert_cap_with_a_clear_error(digits, tmp_path, monkeypatch):
    # a floor no int8 model reaches (every test digit right) and room for one layer back in float
    plugin = importlib.import_module("compactai.measure.openvino")  # the package exports a function of that name
    monkeypatch.setattr(plugin, "ACCURACY_AWARE_MAX_REVERTS", 1)
    with pytest.raises(BudgetNotMetError, match="after putting up to 1 layers back in float"):
        runtime_plugin("openvino").convert(digits.handle, tmp_path / "int8", quantize="int8", task=digits.task,
                                           min_quality=1.0)


@needs_openvino
def test_export_cli_writes_ir_with_parity(small_onnx, tmp_path):
    result = run_cli("export", str(small_onnx), "--format", "openvino", "-o", str(tmp_path / "out"), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout)
    assert data["runtime"] == "openvino" and data["parity"]["ok"]
    assert sorted(Path(f).name for f in data["files"]) == ["model.bin", "model.xml"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["command"] == "export" and saved["model"]["path"] == "model.xml"


def test_export_cli_bad_format_and_flags_exit_2(small_onnx, tmp_path):
    result = run_cli("export", str(small_onnx), "--format", "coreml", "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and "choose one of: onnx, openvino, tflite, pte" in result.stderr
    result = run_cli("export", str(small_onnx), "--min-quality", "0.9", "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and "--quantize int8" in result.stderr


@needs_openvino
def test_profile_runtime_auto_measures_every_installed_runtime(small_onnx):
    result = run_cli("profile", str(small_onnx), "--runtime", "auto", "--queries", "5", "--seconds", "0.02",
                     "--batch", "4", "--no-memory", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout)
    assert set(data["measurements"]) == set(installed_runtimes()) >= {"onnxruntime", "openvino"}
    p50 = {name: m["latency_p50_ms"] for name, m in data["measurements"].items()}
    assert data["fastest"]["batch_1"] == min(p50, key=p50.__getitem__)
    assert data["measurements"]["openvino"]["runtime_settings"]["inference_num_threads"] >= 1


# a missing LiteRT/ExecuTorch venv: tests/measure/test_devices.py
