"""The device runtimes, LiteRT (.tflite) and ExecuTorch (.pte), as registered plug-ins.

Their converters (litert-torch; torch.export + ExecuTorch's XNNPACK lowering) bring large
dependency trees (jax, torchao, coremltools, pandas, an older pydantic) that must not change the
shared environment, so they live in their own venvs (docs/runtimes.md, ``make runtime-venvs``).
Conversion from compactai and a torch-free runner in the main environment are not wired up
yet: with the extra missing these plug-ins say how to install it (exit 2), and with it present
they say plainly that compactai cannot drive them yet rather than pretending to.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compactai.errors import TechniqueError
from compactai.measure.runtime import Runner, RuntimePlugin, register_runtime
from compactai.models.handle import ModelHandle


class _DevicePlugin(RuntimePlugin):
    formats = ()

    @classmethod
    def open(cls, handle: ModelHandle, threads: int | None = None) -> Runner:
        raise TechniqueError(f"compactai cannot run {cls.file_format} models in {cls.name} yet (docs/runtimes.md "
                             f"shows the manual steps); measure on onnxruntime or openvino.")

    @classmethod
    def convert(cls, handle: ModelHandle, out_dir: Path, *, quantize: str | None = None,
                task: Any = None, min_quality: float | None = None) -> ModelHandle:
        cls.require()
        raise TechniqueError(f"compactai cannot convert to {cls.file_format} yet: the {cls.name} converter runs in "
                             f"its own venv (docs/runtimes.md gives the commands); use --format onnx or openvino.")


@register_runtime
class LiteRtPlugin(_DevicePlugin):
    """LiteRT (formerly TensorFlow Lite): ai-edge-litert's interpreter runs .tflite files."""

    name = "litert"
    modules = ("ai_edge_litert",)
    extra = "litert"
    file_format = "tflite"


@register_runtime
class ExecuTorchPlugin(_DevicePlugin):
    """ExecuTorch (PyTorch's on-device runtime): runs .pte programs (XNNPACK delegate on CPUs)."""

    name = "executorch"
    modules = ("executorch",)
    extra = "executorch"
    file_format = "pte"
