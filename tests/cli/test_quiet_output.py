"""Third-party chatter (ONNX Runtime's "please consider pre-processing" and its protobuf dumps,
torch deprecation warnings) goes to the log file, not to the user's terminal; --debug shows it.
The quantize table shows the latency that decided keep/revert and the ops left in float."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHATTER = ("pre-processing", "tensor_type", "elem_type", "DeprecationWarning", "FutureWarning", "UserWarning",
           "TracerWarning", "WARNING root", "py.warnings")


def _cli(args: list[str], log: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COMPACTAI_LOG": str(log)}
    env.pop("COMPACTAI_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "compactai.cli", *args], check=False, capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=log.parent)


@pytest.mark.slow
def test_quantize_keeps_library_warnings_in_the_log(user_zoo, tmp_path: Path) -> None:
    model = user_zoo("sensor")
    args = ["quantize", str(model.onnx), "--data", str(model.data), "--mode", "static", "--no-preprocess",
            "--queries", "20", "--seconds", "0.1"]
    log = tmp_path / "run.log"
    quiet = _cli([*args, "-o", str(tmp_path / "quiet")], log)
    assert quiet.returncode == 0, quiet.stderr
    assert not [word for word in CHATTER if word in quiet.stderr], quiet.stderr
    assert "pre-processing" in log.read_text()  # captured, not lost
    # the table: the deciding measurement, and the GRU that int8 left in float
    decisions = json.loads((tmp_path / "quiet" / "results.json").read_text())["quantization"]
    assert f"{decisions['float_latency_p50_ms']:.3f}" in quiet.stdout
    assert f"{decisions['quantized_latency_p50_ms']:.3f}" in quiet.stdout
    assert "decided on the row above" in quiet.stdout
    assert [op["op_type"] for op in decisions["left_in_float"]] == ["GRU"]
    assert "GRU /gru/GRU: ONNX Runtime has no int8 kernel for GRU" in " ".join(quiet.stdout.split())
    loud = _cli([*args, "-o", str(tmp_path / "loud"), "--debug"], tmp_path / "debug.log")
    assert loud.returncode == 0 and "pre-processing" in loud.stderr


@pytest.mark.slow
def test_profile_of_a_pt2_program_prints_no_torch_warnings(user_zoo, tmp_path: Path) -> None:
    model = user_zoo("mobilenet")
    result = _cli(["profile", str(model.pt2), "--runtime", "onnxruntime", "--queries", "20", "--json"],
                  tmp_path / "profile.log")
    assert result.returncode == 0, result.stderr
    assert not [word for word in CHATTER if word in result.stderr], result.stderr
    assert json.loads(result.stdout)["model"]["kind"] == "cnn"


@pytest.mark.parametrize("command", ["profile", "quantize", "prune", "optimize", "distill", "slice"])
def test_every_command_taking_a_model_path_accepts_hf_task(command: str, capsys) -> None:
    from compactai.cli import main

    assert main([command, "--help"]) == 0
    assert "--hf-task" in capsys.readouterr().out
