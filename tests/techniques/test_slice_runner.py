"""The split runner over loopback HTTP: `compactai slice` writes head/tail, a KServe v2 server holds
the tail, `compactai slice run` returns the unsplit model's outputs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from compactai.cli import main
from compactai.techniques.slice.runner import SplitRunner

from .kserve_stub import kserve_stub

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CUT = "/stem/stem.2/Relu_output_0,/conv1/Conv_output_0"


def _slice(small_onnx: Path, out: Path, compression: str, capfd) -> dict:
    # a two-tensor cut inside the residual block: both tensors travel
    code = main(["slice", str(small_onnx), "--bandwidth-mbps", "100", "--rtt-ms", "1", "--cut", CUT,
                 "--compression", compression, "--rounds", "1", "-o", str(out), "--json"])
    assert code == 0
    result = json.loads(capfd.readouterr().out)
    assert result["deployment"]["tail"] == "tail.onnx" and result["deployment"]["head"] == "head.onnx"
    assert len(result["deployment"]["sent"]) == (2 if compression == "raw" else 4)  # int8: values + scales
    return result


def _reference(out: Path) -> np.ndarray:
    with np.load(out / "inputs.npz", allow_pickle=False) as data:
        feeds = {k: data[k] for k in data.files}
    return feeds, ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("compression", ["raw", "int8"])
def test_split_runner_against_a_kserve_v2_stub(small_onnx: Path, tmp_path: Path, capfd, compression: str) -> None:
    out = tmp_path / "slice"
    result = _slice(small_onnx, out, compression, capfd)
    feeds, reference = _reference(out)
    with kserve_stub(out / "tail.onnx", "tail") as url:
        for binary in (True, False):
            with SplitRunner(out, url, binary=binary) as runner:
                outputs = runner.run(feeds)
            diff = float(np.max(np.abs(next(iter(outputs.values())) - reference)))
            if compression == "raw":
                assert diff < 1e-4
            else:  # the fidelity cost the table reported is the one the wire delivers
                expected = result["cuts"][result["choice"]["index"]]["fidelity"]["int8"]["max_abs_diff"]
                assert diff == pytest.approx(expected, rel=1e-3, abs=1e-6)
        code = main(["slice", "run", str(out), "--remote", url, "--json"])
    assert code == 0
    ran = json.loads(capfd.readouterr().out)
    assert ran["max_abs_diff"] < (1e-4 if compression == "raw" else 0.05)


@pytest.mark.skipif(importlib.util.find_spec("compactai.cli.serve") is None,
                    reason="`compactai serve` is not in this checkout")
def test_split_runner_against_compactai_serve(small_onnx: Path, tmp_path: Path, capfd) -> None:
    out = tmp_path / "slice"
    _slice(small_onnx, out, "raw", capfd)
    feeds, reference = _reference(out)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "compactai.cli", "serve", str(out / "tail.onnx"), "--port", "0",
                               "--name", "tail", "--json"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = server.stdout.readline()  # type: ignore[union-attr]
        url = f"http://127.0.0.1:{json.loads(line)['port']}"
        threading.Thread(target=server.stdout.read, daemon=True).start()  # type: ignore[union-attr]
        with SplitRunner(out, url) as runner:
            outputs = runner.run(feeds)
        assert float(np.max(np.abs(next(iter(outputs.values())) - reference))) < 1e-4
    finally:
        server.terminate()
        server.wait(timeout=30)
