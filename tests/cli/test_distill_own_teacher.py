"""`compactai distill --teacher MODEL --data FILE.npz`: a user's own ONNX model teaches a student
built from its real shape (an MLP at half its hidden widths), trained on the user's data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _with_train_split(data: Path, target: Path) -> Path:
    """The zoo's data.npz plus a train split (its calibration rows), as a user would add one."""
    with np.load(data, allow_pickle=False) as stored:
        arrays = {k: stored[k] for k in stored.files}
    arrays["train/input"], arrays["train/labels"] = arrays["calibration/input"], arrays["calibration/labels"]
    np.savez(target, **arrays)
    return target


@pytest.mark.slow
def test_distill_from_a_users_onnx_teacher_and_data(user_zoo, tmp_path: Path) -> None:
    model = user_zoo("tabular")
    data = _with_train_split(model.data, tmp_path / "data.npz")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMPACTAI_LOG": str(tmp_path / "run.log")}
    result = subprocess.run(
        [sys.executable, "-m", "compactai.cli", "distill", "--teacher", str(model.onnx), "--data", str(data),
         "--epochs", "15", "--patience", "15", "--lr", "0.01", "--batch-size", "16", "--max-minutes", "8",
         "--queries", "20", "-o", str(tmp_path / "out"), "--json"],
        check=False, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "ok" and summary["teacher_params"] == 30 * 64 + 64 + 64 * 32 + 32 + 32 * 2 + 2
    assert summary["student_params"] < summary["teacher_params"]  # MLP 30 -> 32 -> 16 -> 2
    assert summary["best_validation"] > 0.85  # the teacher scores about 0.96; chance is about 0.63
    assert (tmp_path / "out" / "model.onnx").exists()


def test_distill_without_data_or_example_is_bad_input(tmp_path: Path) -> None:
    from compactai.cli import main

    assert main(["distill", "--teacher", str(tmp_path / "model.onnx")]) == 2
