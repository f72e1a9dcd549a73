"""An ONNX model as a frozen torch module, so that it can teach: distillation runs the teacher
under ``torch.no_grad`` for its targets and never trains it, so ONNX Runtime can run it."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compactai.models.handle import ModelHandle, onnx_files


class OnnxTeacher(nn.Module):
    """Runs an ONNX file on ONNX Runtime (CPU) with torch tensors in and out. It has no
    parameters; a buffer holds the file's hash, so the handle's fingerprint names the model."""

    def __init__(self, path: Path, input_names: list[str], output_names: list[str]) -> None:
        super().__init__()
        digest = hashlib.sha256()
        for file in onnx_files(path):
            digest.update(file.read_bytes())
        self.register_buffer("onnx_sha256", torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8))
        self.path = Path(path)
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self._session: Any = None

    def forward(self, *inputs: torch.Tensor) -> Any:
        if self._session is None:
            import onnxruntime as ort

            self._session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        feeds = {name: np.ascontiguousarray(x.detach().cpu().numpy()) for name, x in zip(self.input_names, inputs)}
        outputs = [torch.from_numpy(np.asarray(o)) for o in self._session.run(self.output_names, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def as_teacher(handle: ModelHandle) -> ModelHandle:
    """A torch handle whose module runs the ONNX ``handle`` (torch handles are returned as they are)."""
    if handle.module is not None or handle.path is None:
        return handle
    module = OnnxTeacher(Path(handle.path), handle.input_names, handle.output_names)
    return handle.derive(framework="torch", module=module, path=None,
                         metadata={**handle.metadata, "onnx_teacher": str(handle.path)})
