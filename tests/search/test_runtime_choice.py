"""Choosing the runtime by measurement: candidates on every installed runtime, the quality floor,
the winners per batch regime, and `quantize --runtime auto` end to end (real subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from compactai.measure import MeasureConfig, make_runner, runtime_plugin
from compactai.search.runtimes import build_candidates, measure_candidates, resolve_runtimes, winners
from compactai.tasks import Split, Task, fidelity_metric

needs_openvino = pytest.mark.skipif(not runtime_plugin("openvino").available(),
                                    reason="OpenVINO is not installed: pip install -c constraints.txt 'compactai[openvino]'")
QUICK = MeasureConfig(min_queries=5, min_seconds=0.02, warmup=1, throughput_batch=4, throughput_min_batches=1,
                      memory=False, energy=False, threads=1)


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 16, 16)).astype(np.float32)


@pytest.fixture
def small_task(small_handle):
    name = small_handle.input_names[0]
    reference = make_runner(small_handle, "onnxruntime", threads=1).run
    splits = {split: Split({name: images(24, seed)}) for seed, split in enumerate(("calibration", "validation", "test"))}
    task = Task("random-images", fidelity_metric(reference, "logits"), splits)
    task.baseline = task.evaluate(reference).value
    return task


def test_resolve_runtimes_checks_the_name():
    assert resolve_runtimes("onnxruntime") == ["onnxruntime"]
    assert resolve_runtimes("auto")[0] == "onnxruntime"
    with pytest.raises(KeyError, match="onnxruntime"):
        resolve_runtimes("tensorrt")


@needs_openvino
def test_candidates_on_every_runtime_and_the_floor(small_handle, small_task, tmp_path):
    candidates = build_candidates(small_handle, None, ["onnxruntime", "openvino"], small_task, tmp_path,
                                  min_quality=None)
    assert [c.label for c in candidates] == ["onnxruntime fp32", "openvino fp32", "openvino int8"]
    assert candidates[2].error is None and candidates[2].handle.framework == "openvino"
    measure_candidates(candidates, small_task, QUICK, rounds=2, min_quality=0.5)
    for candidate in candidates:
        figures = candidate.figures
        assert figures["latency_p50_ms"] > 0 and figures["throughput_items_per_s"] > 0 and len(figures["rounds_ms"]) == 2
        assert figures["meets_floor"] and figures["size_bytes"] > 0
    # the fp32 models match the source; the int8 one came from NNCF and is judged on the same task
    assert candidates[0].figures["quality"]["value"] == pytest.approx(small_task.baseline, abs=1e-6)
    assert candidates[1].figures["quality"]["value"] == pytest.approx(small_task.baseline, abs=1e-4)
    assert candidates[2].handle.metadata["openvino"]["precision"] == "int8"
    best = winners(candidates)
    assert best["batch_1"] in candidates and best["throughput"] in candidates
    assert best["batch_1"].figures["latency_p50_ms"] == min(c.figures["latency_p50_ms"] for c in candidates)
    # a floor nobody meets leaves no winner rather than a fast model that lost its quality
    for candidate in candidates:
        candidate.figures["meets_floor"] = candidate.figures["quality_validation"] >= 1.01
    assert winners(candidates) == {"batch_1": None, "throughput": None}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from compactai.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=1200, check=False)


@needs_openvino
@pytest.mark.slow
def test_quantize_runtime_auto_writes_the_winner_with_its_runtime(small_onnx, tmp_path):
    data = tmp_path / "data.npz"
    arrays = {f"{split}/image": images(24, seed) for seed, split in enumerate(("calibration", "validation", "test"))}
    np.savez(data, allow_pickle=False, **arrays)
    out = tmp_path / "out"
    result = run_cli("quantize", str(small_onnx), "--data", str(data), "--mode", "dynamic", "--runtime", "auto",
                     "--max-drop", "50", "--queries", "5", "--seconds", "0.02", "--rounds", "1", "--batch", "4",
                     "--threads", "1", "-o", str(out), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    data_out = json.loads(result.stdout)
    runtimes = {row["runtime"] for row in data_out["runtimes"]}
    assert runtimes == {"onnxruntime", "openvino"}
    chosen = data_out["chosen"]
    assert data_out["winners"]["batch_1"] == chosen["label"]
    winner = next(row for row in data_out["runtimes"] if row["label"] == chosen["label"])
    assert winner["latency_p50_ms"] == min(r["latency_p50_ms"] for r in data_out["runtimes"]
                                           if not r["error"] and r["meets_floor"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["recipe"][-1] == {"technique": "runtime", "params": {
        "runtime": chosen["runtime"], "precision": chosen["precision"], "made_by": winner["made_by"]}}
    assert (out / saved["model"]["path"]).exists()


def test_quantize_unknown_runtime_exits_2(small_onnx, tmp_path):
    result = run_cli("quantize", str(small_onnx), "--runtime", "tensorrt", "-o", str(tmp_path / "o"))
    assert result.returncode == 2 and "Unknown runtime 'tensorrt'" in result.stderr
