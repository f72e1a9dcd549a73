"""What the server runs: one ONNX Runtime session per loaded version, and where versions come from.

A served source is one of:

- an **install directory** of the update agent (``state.json``, ``versions/N/``): the active
  version is served; ``--update-source`` installs newer ones beside it;
- a **bundle** directory or .tar archive: verified (signature by a ``--trusted-key``, hashes,
  golden self-test) before it is loaded; unsigned bundles are refused;
- a plain **.onnx** file: served as version 1, without verification (the user vouches for it).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compactai.bundle import VerifyPolicy, parse_manifest, read_metadata, verify_bundle
from compactai.bundle.verify import load_arrays
from compactai.errors import BadInputError, ModelNotFoundError
from compactai.models.handle import DEVICE_SUFFIXES
from compactai.models.load import load_onnx, synthesize_inputs
from compactai.runtime.server.protocol import TensorMeta, tensor_meta

DRIFT_PROFILE_FILE = "drift_profile.json"
NUMPY_TYPES = {"bool": "BOOL", "uint8": "UINT8", "int8": "INT8", "int32": "INT32", "int64": "INT64",
               "float16": "FP16", "float32": "FP32", "float64": "FP64"}
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class LoadedVersion:
    """One version of a model with its ONNX Runtime session and protocol signature."""

    name: str
    version: str
    model_path: Path
    threads: int
    manifest: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None  # the bundle directory (None for a plain .onnx)

    def __post_init__(self) -> None:
        if self.model_path.suffix.lower() in DEVICE_SUFFIXES:
            from compactai.errors import UnsupportedFormatError

            raise UnsupportedFormatError(
                f"{self.model_path.name} is a {self.manifest.get('runtime') or 'device'} model for devices; compactai "
                "serve serves ONNX and OpenVINO models. Run it with its runtime on the device, or bundle the ONNX "
                "model (compactai export --format onnx) to serve it here.")
        self.runtime = "openvino" if self.model_path.suffix == ".xml" else "onnxruntime"
        if self.runtime == "openvino":
            self._open_openvino()
            return
        import onnxruntime as ort

        options = ort.SessionOptions()
        # explicit thread counts (as compactai.measure does): intra-op for one run, inter-op 1
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.model_path), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.inputs: list[TensorMeta] = [tensor_meta(i) for i in self.session.get_inputs()]
        self.outputs: list[TensorMeta] = [tensor_meta(o) for o in self.session.get_outputs()]
        self.output_names = [o.name for o in self.outputs]
        self.size_bytes = sum(p.stat().st_size for p in _model_files(self.model_path, self.manifest, self.root))
        # micro-batching stacks requests on axis 0: only when every input and output has a dynamic first axis
        self.batchable = all(t.shape and t.shape[0] == -1 for t in self.inputs + self.outputs)
        self.loaded_at = time.time()

    def _open_openvino(self) -> None:
        """An OpenVINO IR (a bundle whose manifest says runtime openvino), through the measure plug-in."""
        from compactai.measure import make_runner
        from compactai.measure.openvino import load_openvino

        handle = load_openvino(self.model_path)
        self._ir_inputs = handle.inputs
        self._runner = make_runner(handle, "openvino", self.threads)
        self._lock = threading.Lock()  # one infer request: calls take turns

        def meta(spec: Any) -> TensorMeta:
            datatype = NUMPY_TYPES.get(spec.dtype)
            if datatype is None:
                raise BadInputError(f"Tensor {spec.name!r} has type {spec.dtype}, which the protocol cannot carry.")
            return TensorMeta(spec.name, datatype, tuple(d if isinstance(d, int) and d >= 0 else -1 for d in spec.shape))

        self.inputs = [meta(spec) for spec in handle.inputs]
        self.outputs = [meta(spec) for spec in handle.outputs]
        self.output_names = [o.name for o in self.outputs]
        self.size_bytes = sum(p.stat().st_size for p in (self.model_path, self.model_path.with_suffix(".bin")))
        self.batchable = all(t.shape and t.shape[0] == -1 for t in self.inputs + self.outputs)
        self.loaded_at = time.time()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One ONNX Runtime call (thread-safe; releases the GIL while it computes), or one OpenVINO
        inference (its request serves one call at a time)."""
        if self.runtime == "openvino":
            with self._lock:
                return self._runner.run(feeds)
        return list(self.session.run(self.output_names, feeds))

    def warm_up(self) -> None:
        """Run once on the golden inputs (or zeros) so the first live request is not the slow one."""
        feeds: dict[str, np.ndarray] | None = None
        golden = (self.manifest.get("golden") or {}).get("inputs")
        if golden and self.root is not None:
            feeds = load_arrays(self.root / golden)
        if feeds is None:
            feeds = synthesize_inputs(self._ir_inputs if self.runtime == "openvino"
                                      else load_onnx(self.model_path).inputs, batch=1)
        self.run(feeds)

    def drift_profile(self) -> dict[str, Any] | None:
        """The bundle's drift reference profile (a signed, listed file), or None for bundles without one."""
        if self.root is None:
            return None
        listed = {entry["path"] for entry in self.manifest.get("files", [])}
        name = self.manifest.get("drift_profile") or DRIFT_PROFILE_FILE
        if name not in listed or not (self.root / name).is_file():
            return None
        profile = json.loads((self.root / name).read_text())
        return profile if isinstance(profile, dict) else None

    def metadata(self) -> dict[str, Any]:
        """The protocol's model metadata for this version."""
        return {"name": self.name, "versions": [self.version],
                "platform": "openvino_ir" if self.runtime == "openvino" else "onnxruntime_onnx",
                "inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


def _model_files(model_path: Path, manifest: dict[str, Any], root: Path | None) -> list[Path]:
    if root is None:
        return [model_path]
    files = [root / e["path"] for e in manifest.get("files", []) if e["path"].endswith((".onnx", ".data"))]
    return files or [model_path]


def source_kind(path: Path) -> str:
    """"install", "bundle", "archive" or "onnx" for a path given to ``compactai serve``."""
    if path.is_dir():
        if (path / "state.json").exists() or (path / "versions").is_dir():
            return "install"
        if (path / "manifest.json").is_file():
            return "bundle"
        if not any(path.iterdir()):
            return "install"  # an empty directory: an install dir that --update-source fills
        raise BadInputError(f"{path} is neither an install directory (state.json, versions/) nor a bundle "
                            "(manifest.json). Pass one of those, a .tar bundle or an .onnx file.")
    if path.is_file():
        if path.name.endswith(ARCHIVE_SUFFIXES):
            return "archive"
        if path.suffix.lower() == ".onnx":
            return "onnx"
        raise BadInputError(f"{path.name} is not an .onnx file or a .tar bundle; compactai serve runs ONNX models.")
    raise ModelNotFoundError(f"Not found: {path}. Pass an install directory, a bundle, a .tar bundle or an .onnx "
                             "file (or a new directory together with --update-source).")


def load_bundle(source: Path, trusted_keys: list[Any], threads: int, name: str | None) -> LoadedVersion:
    """Verify a bundle (directory or archive) with every check and the self-test, then load it."""
    if not trusted_keys:
        raise BadInputError(f"{source} is a bundle: give --trusted-key PUB to verify its signature (unsigned "
                            "or unverified bundles are not served; serve the .onnx file itself to skip checks).")
    workdir = Path(tempfile.mkdtemp(prefix="compactai-serve-")) / "bundle" if source.is_file() else None
    verified = verify_bundle(source, VerifyPolicy(trusted_keys), validate=True, workdir=workdir)
    manifest = verified.manifest
    return LoadedVersion(name or manifest["name"], str(manifest["version"]), verified.model_path, threads,
                         manifest, verified.root)


def load_installed(version_dir: Path, threads: int, name: str | None) -> LoadedVersion:
    """A version the update agent installed (it verified it before activating it)."""
    manifest = parse_manifest(read_metadata(version_dir)[0])
    return LoadedVersion(name or manifest["name"], str(manifest["version"]), version_dir / manifest["model"],
                         threads, manifest, version_dir)


def load_onnx_file(path: Path, threads: int, name: str | None) -> LoadedVersion:
    return LoadedVersion(name or path.stem, "1", path, threads)
