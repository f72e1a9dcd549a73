"""`compactai nas` end to end in a real subprocess, on a tiny labelled .npz and a declared MLP space."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _data(path: Path) -> Path:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, size=(4, 10))
    arrays = {}
    for split, rows in (("train", 160), ("validation", 80), ("test", 80)):
        labels = rng.integers(0, 4, size=rows)
        arrays[f"{split}/x"] = (centres[labels] + rng.normal(0, 1, size=(rows, 10))).astype(np.float32)
        arrays[f"{split}/labels"] = labels
    np.savez(path, **arrays)
    return path


def _nas(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"family": "mlp", "choices": {"layers": [1], "hidden": [8, 16], "dropout": [0.0]}}))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMPACTAI_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "compactai.cli", "nas", "--data", str(_data(tmp_path / "blobs.npz")), "--space",
         str(space), "--max-trials", "2", "--min-epochs", "1", "--threads", "1",
         "--remeasure-rounds", "0", "--json", *args],
        capture_output=True, text=True, env=env, timeout=600, check=False)


def test_nas_writes_model_architecture_results_and_report(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _nas(tmp_path, "--budget", "latency_p90_ms<=1000", "--epochs", "8", "--lr", "0.03", "-o", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["status"] == "ok" and set(summary["counts"]) <= {"ok", "pruned"}
    for name in ("model.onnx", "architecture.json", "results.json", "report.html"):
        assert (out / name).is_file(), name
    spec = json.loads((out / "architecture.json").read_text())
    assert spec["family"] == "mlp" and spec["hidden"][0] in (8, 16)
    results = json.loads((out / "results.json").read_text())
    assert results["command"] == "nas" and len(results["nas"]["candidates"]) == 2
    assert "Fidelity schedule" in (out / "report.html").read_text()


def test_nas_exits_3_and_writes_the_closest_when_nothing_fits(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _nas(tmp_path, "--budget", "latency_p90_ms<=0.000001", "--epochs", "2", "-o", str(out))
    assert done.returncode == 3, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["status"] == "budget_not_met" and summary["counts"].get("rejected") == 2
    assert (out / "model.onnx").is_file() and (out / "architecture.json").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--space", "rnn"], "neither a built-in space"),
    (["--budget", "size_mb<=3"], "give exactly one latency_p90_ms limit"),
    (["--budget", "latency_p90_ms<=0.5x"], "relative budget"),
    (["--space", "encoder"], "use --example minilm"),
    (["--compare-student", "layers:0,2"], "--compare-student is for the encoder space"),
    (["--relative-to", "student"], "--relative-to student times candidates against the --compare-student"),
    (["--relative-to", "median"], "--relative-to must be teacher or student"),
])
def test_nas_bad_input_exits_2(tmp_path: Path, args: list[str], message: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMPACTAI_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "compactai.cli", "nas", "--data", str(_data(tmp_path / "d.npz")),
                           "-o", str(tmp_path / "o"), *args], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-1000:]


def test_nas_exits_3_when_the_chosen_model_did_not_learn(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _nas(tmp_path, "--budget", "latency_p90_ms<=1000", "--epochs", "1", "--lr", "1e-7", "-o", str(out))
    assert done.returncode == 3, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["status"] == "quality_lost" and summary["sanity"]["passed"] is False
    assert "did not learn" in done.stderr and (out / "model.onnx").is_file()
