"""The CLI as a user runs it: a real subprocess, exit codes, one-line errors, --json."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from compactai.measure.runtime import installed_runtimes

# runtimes `profile --runtime all` (the default) adds when their extra is installed
EXTRA_RUNTIMES = {name for name in installed_runtimes() if name not in ("onnxruntime", "torch")}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from compactai.cli import main; main()", *args],
        capture_output=True, text=True, cwd=cwd, timeout=900, check=False,
    )


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    assert "profile" in result.stdout


def test_profile_onnx_json(small_onnx):
    result = run_cli("profile", str(small_onnx), "--json", "--queries", "30", "--seconds", "0.1", "--no-memory")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    ort = data["measurements"]["onnxruntime"]
    # every installed runtime (OpenVINO with its extra), never torch: an ONNX file has no torch module
    assert set(data["measurements"]) == {"onnxruntime", *EXTRA_RUNTIMES}
    assert ort["latency_queries"] >= 30 and ort["latency_p90_ms"] >= ort["latency_p50_ms"] > 0
    assert ort["size_bytes"] == small_onnx.stat().st_size


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip() and not ln.startswith("Profiling")]
    return " ".join(lines)


def test_missing_file_exit_2(tmp_path):
    message = _one_line_error(run_cli("profile", str(tmp_path / "absent.onnx")))
    assert "Model not found" in message


def test_unsupported_format_exit_2(tmp_path):
    path = tmp_path / "m.h5"
    path.write_bytes(b"\x89HDF")
    assert "Unsupported model format" in _one_line_error(run_cli("profile", str(path)))


def test_corrupt_onnx_exit_2(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not onnx at all")
    assert "not a valid ONNX model" in _one_line_error(run_cli("profile", str(path)))


def test_pickle_exit_2_and_marker_absent(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "model.pth"

    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "x"))

    path.write_bytes(pickle.dumps(Payload()))
    assert "pickle" in _one_line_error(run_cli("profile", str(path)))
    assert not marker.exists()


def test_unknown_runtime_and_example_exit_2(small_onnx):
    assert "Unknown runtime" in _one_line_error(run_cli("profile", str(small_onnx), "--runtime", "tensorrt"))
    assert "Unknown example" in _one_line_error(run_cli("profile", "--example", "mnist"))


def test_debug_shows_traceback(tmp_path):
    result = run_cli("profile", str(tmp_path / "absent.onnx"), "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
def test_profile_minilm_export_fidelity():
    result = run_cli("profile", "--example", "minilm", "--json", "--queries", "30", "--seconds", "0.2", "--no-memory")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["parity"]["cosine_min"] >= 0.9999
    assert set(data["measurements"]) == {"torch", "onnxruntime", *EXTRA_RUNTIMES}
    for figures in data["measurements"].values():
        assert figures["latency_p50_ms"] > 0 and figures["quality"]["metric"] == "embedding_fidelity"


def test_typer_exit_code_is_kept():
    import typer

    from compactai.cli import main
    from compactai.cli._common import app

    @app.command("exit-with-4", hidden=True)
    def _exit_with_4() -> None:
        raise typer.Exit(4)

    try:
        assert main(["exit-with-4"]) == 4
    finally:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name != "exit-with-4"]
