"""ModelHandle: a model plus everything needed to run, export and measure it."""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from compactai.errors import CompactAIError, InputSignatureError, UnsupportedFormatError

# the file formats of the device runtimes (measure/devices.py), by suffix: what a bundle, the verifier,
# the server and results.json recognise them by
DEVICE_SUFFIXES = {".tflite": "litert", ".pte": "executorch"}
DEVICE_RUNTIMES = tuple(DEVICE_SUFFIXES.values())

if TYPE_CHECKING:
    import torch

# (torch handle, target path, check parity) -> ONNX handle. compactai.export provides it and sits a
# layer above this one (it needs ModelHandle), so it plugs itself in when imported instead of this
# module importing upwards; see docs/architecture.md.
OnnxExporter = Callable[["ModelHandle", Path, bool], "ModelHandle"]
_onnx_exporter: list[OnnxExporter] = []


def use_onnx_exporter(exporter: OnnxExporter) -> None:
    """Make ``exporter`` the one :meth:`ModelHandle.to_onnx` converts with."""
    _onnx_exporter[:] = [exporter]


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model input or output. Dynamic axes are named strings."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TensorSpec:
        return cls(data["name"], tuple(data["shape"]), data["dtype"])


@dataclass
class ModelHandle:
    """A loaded model: a torch module or an ONNX file, with its signature and example inputs.

    ``kind`` ("cnn", "mlp", "transformer", "generic") lets the search pick sensible defaults.
    ``metadata`` carries plain data: lineage, technique decisions, the ONNX export settings.
    """

    framework: str  # "torch" | "onnx" | a runtime's own format ("openvino")
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    example_inputs: dict[str, np.ndarray]
    module: torch.nn.Module | None = None
    path: Path | None = None
    kind: str = "generic"
    metadata: dict[str, Any] = field(default_factory=dict)
    _onnx_cache: ModelHandle | None = field(default=None, repr=False, compare=False)

    @property
    def input_names(self) -> list[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [spec.name for spec in self.outputs]

    def derive(self, **changes: Any) -> ModelHandle:
        """A copy with some fields changed (the ONNX cache is dropped, since the model changed)."""
        changes.setdefault("_onnx_cache", None)
        changes.setdefault("metadata", dict(self.metadata))
        return replace(self, **changes)

    def as_onnx(self, path: Path, **metadata: Any) -> ModelHandle:
        """A handle for the ONNX file ``path`` with this model's signature (e.g. after quantizing)."""
        return self.derive(framework="onnx", path=Path(path), module=None,
                           metadata={**self.metadata, **metadata})

    def fingerprint(self) -> str:
        """Content hash of the model's weights and signature (sha256 hex, 16 chars)."""
        digest = hashlib.sha256()
        digest.update(repr([s.to_dict() for s in self.inputs + self.outputs]).encode())
        if self.module is not None:
            digest.update(type(self.module).__name__.encode())
            for key, value in self.module.state_dict().items():
                digest.update(key.encode())
                digest.update(str(tuple(value.shape)).encode())
                digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif self.path is not None:
            for file in onnx_files(self.path):
                digest.update(file.read_bytes())
        return digest.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """Name, kind, framework, signature and fingerprint as plain data (for results.json)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "framework": self.framework,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "fingerprint": self.fingerprint(),
            # what a loader chose (e.g. a Hugging Face head), so a profile never hides a different model
            **{key: self.metadata[key] for key in ("architecture", "hf_task", "output_kind") if key in self.metadata},
        }

    def check_feeds(self, feeds: dict[str, np.ndarray]) -> None:
        """Raise InputSignatureError when ``feeds`` do not match the input signature."""
        check_feeds(self.inputs, feeds)

    def run_torch(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run the torch module on numpy inputs; returns one array per output."""
        import torch

        if self.module is None:
            raise InputSignatureError(f"Model '{self.name}' is an ONNX model; run it with onnxruntime.")
        self.check_feeds(feeds)
        args = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in self.input_names]
        with torch.inference_mode():
            result = self.module(*args)
        return [t.detach().cpu().numpy() for t in flatten_outputs(result)]

    def to_onnx(self, path: str | Path | None = None, *, parity: bool = True) -> ModelHandle:
        """This model as an ONNX handle; torch models are exported (with a parity check) and cached."""
        if self.framework == "onnx":
            return self
        if self.module is None:  # a runtime's own format (OpenVINO IR, .tflite, .pte): no way back to ONNX
            raise UnsupportedFormatError(
                f"Model '{self.name}' is a {self.framework} model ({self.path}); it has no ONNX form. "
                f"Run it with --runtime {self.framework}, or start from the ONNX or torch model."
            )
        if self._onnx_cache is not None and (path is None or Path(path) == self._onnx_cache.path):
            return self._onnx_cache
        if not _onnx_exporter:
            raise CompactAIError(
                "No ONNX exporter is registered; import compactai (or compactai.export) before converting."
            )
        if path is None:
            path = Path(tempfile.mkdtemp(prefix="compactai-")) / f"{self.name}.onnx"
        onnx_handle = _onnx_exporter[0](self, Path(path), parity)
        self._onnx_cache = onnx_handle
        return onnx_handle


def set_eval(module: Any) -> None:
    """Put a module in eval mode; modules from torch.export are already frozen and refuse eval()."""
    with contextlib.suppress(NotImplementedError):
        module.eval()


def flatten_outputs(result: Any) -> list[Any]:
    """Model outputs (tensor, tuple, list, dict or HF ModelOutput) as a flat list of tensors."""
    if hasattr(result, "to_tuple"):
        result = result.to_tuple()
    if isinstance(result, dict):
        result = list(result.values())
    if isinstance(result, (list, tuple)):
        flat: list[Any] = []
        for item in result:
            flat.extend(flatten_outputs(item))
        return flat
    return [result]


def output_specs(module: Any, args: tuple, names: list[str] | None = None) -> list[TensorSpec]:
    """Run ``module`` once and describe its outputs (dynamic batch axis 0)."""
    import torch

    with torch.inference_mode():
        result = flatten_outputs(module(*args))
    specs = []
    for i, tensor in enumerate(result):
        name = names[i] if names and i < len(names) else ("output" if len(result) == 1 else f"output_{i}")
        shape: tuple[int | str, ...] = ("batch", *tuple(tensor.shape[1:])) if tensor.ndim else ()
        specs.append(TensorSpec(name, shape, str(tensor.detach().numpy().dtype)))
    return specs


def onnx_files(path: Path) -> list[Path]:
    """The ONNX file and its external-data files, if any (they sit next to it)."""
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    weights = path.with_suffix(".bin")  # an OpenVINO IR is model.xml + model.bin
    if path.suffix == ".xml" and weights.exists():
        files.append(weights)
    return files


def check_feeds(specs: list[TensorSpec], feeds: dict[str, np.ndarray]) -> None:
    """Check names, rank, fixed dimensions and dtype kind of ``feeds`` against ``specs``."""
    expected = [s.name for s in specs]
    missing = [n for n in expected if n not in feeds]
    if missing:
        raise InputSignatureError(
            f"Missing input(s) {missing}; the model expects inputs named {expected}."
        )
    for spec in specs:
        array = np.asarray(feeds[spec.name])
        shape_text = "(" + ", ".join(str(d) for d in spec.shape) + ")"
        if array.ndim != len(spec.shape) or any(
            isinstance(d, int) and d > 0 and d != actual for d, actual in zip(spec.shape, array.shape)
        ):
            raise InputSignatureError(
                f"Input '{spec.name}' has shape {tuple(array.shape)} but the model expects {shape_text}; "
                "reshape the data to match."
            )
        want = np.dtype(spec.dtype)
        if array.dtype != want:
            raise InputSignatureError(
                f"Input '{spec.name}' has dtype {array.dtype} but the model expects {want}; "
                f"convert it with .astype('{want}')."
            )
