"""`compactai bench --runtime NAME` on the runtime plug-ins: OpenVINO on an ONNX file and on its
own IR, and a runtime that is not installed (or not known) refused with exit 2 and the way to fix it."""

from __future__ import annotations

import json

import pytest

from compactai.measure import runtime_plugin
from tests.cli.test_bad_input import _data, _mlp_onnx, refused, run_cli

QUICK = ["--scenario", "single-stream", "--duration", "0.3", "--min-queries", "70"]
needs_openvino = pytest.mark.skipif(not runtime_plugin("openvino").available(),
                                    reason="OpenVINO is not installed: pip install -c constraints.txt 'compactai[openvino]'")


@needs_openvino
def test_bench_runs_a_scenario_on_openvino_from_onnx_and_from_its_ir(tmp_path):
    from compactai.models import load_model

    model, data = _mlp_onnx(tmp_path / "mlp.onnx"), _data(tmp_path / "data.npz")
    runs = {}
    for name in ("onnxruntime", "openvino"):
        run = run_cli("bench", str(model), "--data", str(data), "--runtime", name, *QUICK, "--json", timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[name] = json.loads(run.stdout)
    ov = runs["openvino"]
    assert ov["runtime"] == "openvino" and ov["scenarios"]["single-stream"]["queries"] >= 70
    assert "bench mlp on openvino" in run.stderr
    # the same fp32 model on both runtimes: the same accuracy on the same 24 test rows
    assert ov["quality"]["value"] == runs["onnxruntime"]["quality"]["value"]
    # OpenVINO's own IR (as optimize --runtime writes it to OUT/openvino/) is benchmarked as it is
    ir = runtime_plugin("openvino").convert(load_model(str(model)), tmp_path / "ir")
    run = run_cli("bench", str(ir.path), "--data", str(data), "--runtime", "openvino", *QUICK, "--json", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    from_ir = json.loads(run.stdout)
    assert from_ir["model"]["framework"] == "openvino" and from_ir["scenarios"]["single-stream"]["p50_ms"] > 0
    assert from_ir["size_mb"] * 1e6 == (tmp_path / "ir" / "model.bin").stat().st_size + ir.path.stat().st_size
    assert from_ir["quality"]["value"] == runs["onnxruntime"]["quality"]["value"]


def test_bench_refuses_an_unknown_or_missing_runtime_with_exit_2(tmp_path, monkeypatch):
    model = _mlp_onnx(tmp_path / "mlp.onnx")
    assert "openvino" in refused(run_cli("bench", str(model), "--runtime", "tensorrt"))
    monkeypatch.setenv("COMPACTAI_LITERT_PYTHON", str(tmp_path / "no-venv" / "bin" / "python"))
    line = refused(run_cli("bench", str(model), "--runtime", "litert"))
    assert "litert" in line and "make runtime-venvs" in line
