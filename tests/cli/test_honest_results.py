"""Anytime results are honest: a model that lost its quality is never shown as a success (exit 3,
no speed-up next to it), and a model with a fixed batch is measured at that batch, saying so."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_bad_input import _data, _mlp_onnx, run_cli


def test_profile_measures_a_fixed_batch_model_at_its_batch(tmp_path):
    model = _mlp_onnx(tmp_path / "batch32.onnx", batch=32)
    result = run_cli("profile", str(model), "--json", "--queries", "20", "--seconds", "0.05", "--no-memory")
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout)["measurements"]["onnxruntime"]
    assert figures["latency_batch"] == 32 and figures["throughput_batch"] == 32
    assert figures["latency_p50_ms"] > 0 and figures["macs"] == 8 * 16 + 16 * 3  # per item, not per batch
    assert any("fix the batch at 32" in note for note in figures["notes"])
    assert "fix the batch at 32" in result.stderr  # the human output says it too


def test_optimize_with_nothing_above_the_quality_floor_exits_3_and_keeps_the_closest(tmp_path):
    model, data = _mlp_onnx(tmp_path / "mlp.onnx"), _data(tmp_path / "data.npz")
    out = tmp_path / "out"
    result = run_cli("optimize", str(model), "--data", str(data), "-o", str(out), "--min-quality", "abs:1.01",
                     "-b", "size_mb<=100", "--max-trials", "1", "--quick", "--remeasure-rounds", "0",
                     "--techniques", "quantize", "--json", timeout=600)
    assert result.returncode == 3, result.stderr[-3000:]
    saved = json.loads(result.stdout)
    assert saved["chosen"] is None and saved["selection"]["closest"]
    # the closest model is the output (issue 15), marked as not meeting the budget
    assert (out / "model.onnx").exists()
    written = json.loads((out / "results.json").read_text())
    assert written["budget_met"] is False and written["closest"]
    assert list((out / "candidates").glob("*/model.onnx"))


@pytest.mark.slow
def test_distill_stopped_before_the_student_learned_exits_3(tmp_path, digits):
    out = tmp_path / "out"
    result = run_cli("distill", "--example", "digits", "--student", "digits-cnn:4,8,8", "--max-minutes", "0.0001",
                     "--queries", "5", "-o", str(out), "--json", timeout=900)
    assert result.returncode == 3, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["status"] == "quality_lost" and summary["sanity"]["passed"] is False
    assert summary["stopped"] == "time_budget"
    assert "did not learn" in result.stderr and "QUALITY LOST" in result.stderr
    assert "speed-up" not in result.stderr
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "quality_lost" and (out / "model.onnx").exists()  # anytime: kept, marked unusable


@pytest.mark.slow
def test_prune_past_the_quality_floor_exits_3_without_a_speed_up(tmp_path, digits):
    out = tmp_path / "out"
    result = run_cli("prune", "--example", "digits", "--ratio", "0.5", "--target", "macs", "--finetune-epochs", "0",
                     "--max-drop", "0", "--runtime", "onnxruntime", "--queries", "5", "--seconds", "0.05",
                     "-o", str(out), "--json", timeout=900)
    assert result.returncode == 3, result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert data["status"] == "quality_lost" and data["quality"]["drop"] > 0
    assert "QUALITY LOST" in result.stderr and "speed-up" not in result.stderr
    assert json.loads((out / "results.json").read_text())["status"] == "quality_lost"


def test_prune_fine_tunes_by_default_on_labelled_tasks(digits):
    from compactai.cli.prune import default_finetune_epochs

    assert default_finetune_epochs(digits.task, reconstruct=False) == 3
    assert default_finetune_epochs(digits.task, reconstruct=True) == 0
    assert default_finetune_epochs(None, reconstruct=False) == 0
