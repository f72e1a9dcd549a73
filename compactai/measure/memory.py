"""Peak memory of loading and running a model, measured in a fresh subprocess.

The parent writes the inputs with ``np.savez`` (no pickle) and runs ``_memprobe.py`` as a
script (it imports only numpy and the runtime, not compactai), which records its RSS,
loads the model, runs it a few times and reports its peak RSS (VmHWM).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compactai.models.handle import ModelHandle

PROBE = Path(__file__).with_name("_memprobe.py")


@dataclass
class MemoryStats:
    peak_mb: float  # whole process: interpreter + runtime + model + activations
    model_mb: float  # peak minus RSS after importing the runtime
    runtime: str


def measure_peak_memory(handle: ModelHandle, runtime: str, threads: int, runs: int = 5) -> MemoryStats | None:
    """Peak RSS in MB of a subprocess that loads and runs the model; None if it cannot be measured."""
    with tempfile.TemporaryDirectory(prefix="compactai-mem-") as tmp:
        inputs = Path(tmp) / "inputs.npz"
        np.savez(inputs, allow_pickle=False, **handle.example_inputs)
        if runtime == "onnxruntime":
            model_path = handle.to_onnx().path
        elif runtime == "openvino":  # its IR, or the ONNX file OpenVINO reads (as its runner does)
            model_path = handle.path if handle.framework == "openvino" else handle.to_onnx().path
        else:
            model_path = Path(tmp) / "model.pt2"
            try:
                _save_pt2(handle, model_path)
            except Exception:  # noqa: BLE001 (best effort: any failure means "not available")
                return None
        command = [sys.executable, str(PROBE), runtime, str(model_path), str(inputs),
                   "--threads", str(threads), "--runs", str(runs)]
        if runtime == "openvino":
            from compactai.measure.openvino import runner_config

            command += ["--config", json.dumps(runner_config(threads))]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            return None
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        return MemoryStats(peak_mb=data["peak_mb"], model_mb=data["peak_mb"] - data["base_mb"], runtime=runtime)


def _save_pt2(handle: ModelHandle, path: Path) -> None:
    import torch

    args = tuple(torch.from_numpy(np.ascontiguousarray(handle.example_inputs[n])) for n in handle.input_names)
    program = torch.export.export(handle.module, args)  # type: ignore[arg-type]
    torch.export.save(program, str(path))


