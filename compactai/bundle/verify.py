"""Verify a bundle: TUF-style checks in a fixed order, then a model self-test.

The checks run in this order, and the first failure refuses the bundle with a short
reason code (``BundleRefused.reason``) and a one-line message:

1. ``signature``  the detached Ed25519 signature over manifest.json, by a trusted key
2. ``expiry``     the manifest has not expired (freeze attack)
3. ``version``    not block-listed and strictly newer than the highest version ever trusted (rollback)
4. ``paths``      manifest names are relative without ``..``, the model and golden files are listed
                 files; no symlinks or special files on disk
5. ``file set``   exactly the files the manifest lists, no more, no fewer (mix-and-match)
6. ``hashes``     every file's size and SHA-256
7. ``external data``  ONNX external-data locations stay inside the bundle and are listed files
8. ``pickle``     no pickle-based file anywhere (refused by content, never opened by pickle)

Path names are checked before any listed file is opened (the model and golden files must be
listed files too), so a hostile name cannot make the verifier read outside the bundle; an
archive is staged by :func:`compactai.bundle.stage.stage_bundle`, which verifies the metadata
before it extracts anything. Only then does :func:`validate_model` load the model: ONNX
checker, ONNX Runtime session, golden outputs within the signed tolerance.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compactai.bundle.manifest import METADATA_FILES, BundleRefused, sha256_file, unsafe_path_reason
from compactai.bundle.stage import (  # checks 1-4 live in stage.py, which runs them before staging any file
    VerifyPolicy,
    check_manifest_paths,
    read_metadata,
    stage_bundle,
    verify_metadata,
)
from compactai.models.handle import DEVICE_RUNTIMES, DEVICE_SUFFIXES
from compactai.models.safety import pickle_reason


@dataclass
class VerifiedBundle:
    """A bundle that passed every check: its directory, manifest and which steps ran."""

    root: Path
    manifest: dict[str, Any]
    key_id: str
    steps: list[str] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest["model"]


def check_paths(root: Path, manifest: dict[str, Any]) -> None:
    check_manifest_paths(manifest)
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(directory) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                raise BundleRefused("symlink", f"{path.relative_to(root)} is a symlink; bundles may not "
                                               "contain symlinks.")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BundleRefused("unsafe-path", f"{path.relative_to(root)} is not a regular file.")


def list_files(root: Path) -> set[str]:
    """Every regular file under ``root`` as a relative POSIX path, metadata files excluded."""
    found = set()
    for directory, _dirs, files in os.walk(root, followlinks=False):
        for name in files:
            found.add((Path(directory) / name).relative_to(root).as_posix())
    return found - set(METADATA_FILES)


def check_file_set(root: Path, manifest: dict[str, Any]) -> None:
    listed = [entry["path"] for entry in manifest["files"]]
    if len(listed) != len(set(listed)):
        raise BundleRefused("bad-manifest", "The manifest lists a file twice.")
    present = list_files(root)
    extra, missing = sorted(present - set(listed)), sorted(set(listed) - present)
    if missing:
        raise BundleRefused("missing-file", f"The bundle lacks file(s) the manifest lists: {missing}.")
    if extra:
        raise BundleRefused("extra-file", f"The bundle holds file(s) the manifest does not list: {extra}.")
    if manifest["model"] not in listed:
        raise BundleRefused("bad-manifest", f"The manifest's model {manifest['model']!r} is not among its files.")


def check_hashes(root: Path, manifest: dict[str, Any]) -> None:
    for entry in manifest["files"]:
        path = root / entry["path"]
        size = path.stat().st_size
        if size != entry["size"]:
            raise BundleRefused("hash-mismatch", f"{entry['path']} is {size} bytes; the manifest signs "
                                                 f"{entry['size']} bytes.")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise BundleRefused("hash-mismatch", f"{entry['path']} has SHA-256 {digest[:16]}..., the manifest signs "
                                                 f"{entry['sha256'][:16]}...: the file was altered.")


def external_data_locations(model_path: Path) -> list[str]:
    """The external-data ``location`` of every tensor of an ONNX file, read without loading the data."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(model_path), load_external_data=False)
    locations = []
    for tensor in _get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {item.key: item.value for item in tensor.external_data}
            locations.append(info.get("location", ""))
    return locations


def check_external_data(root: Path, manifest: dict[str, Any]) -> None:
    listed = {entry["path"] for entry in manifest["files"]}
    # the model is checked whatever its name: ONNX Runtime would follow its external data all the same;
    # an OpenVINO bundle's model is an IR whose weights are the listed model.bin beside it (OpenVINO opens
    # nothing else), and it must be named so
    model = manifest["model"]
    if manifest.get("runtime") == "openvino":
        if not (model.endswith(".xml") and model[:-4] + ".bin" in listed):
            raise BundleRefused("invalid-model", f"An OpenVINO bundle's model must be an IR .xml with its .bin listed "
                                                 f"beside it; got {model!r}.")
        model_set: set[str] = set()
    elif manifest.get("runtime") in DEVICE_RUNTIMES:
        if not model.endswith(tuple(DEVICE_SUFFIXES)):
            raise BundleRefused("invalid-model", f"A {manifest['runtime']} bundle's model must be a .tflite or .pte "
                                                 f"file; got {model!r}.")
        model_set = set()  # a flatbuffer with its weights inside: it references no other file
    else:
        model_set = {model}
    for onnx_file in sorted({p for p in listed if p.endswith(".onnx")} | model_set):
        try:
            locations = external_data_locations(root / onnx_file)
        except Exception as exc:  # a protobuf DecodeError; the file was signed, so the publisher erred
            raise BundleRefused("invalid-model", f"{onnx_file} is not a valid ONNX file "
                                                 f"({str(exc).splitlines()[0][:200]}).") from exc
        base = Path(onnx_file).parent
        for location in locations:
            reason = unsafe_path_reason(location)
            target = (base / location).as_posix() if not reason else location
            if reason or target not in listed:
                raise BundleRefused("external-data", f"{onnx_file} references external data at {location!r}, "
                                                     f"outside the bundle's signed files"
                                                     f"{': ' + reason if reason else ''}.")


def check_no_pickle(root: Path, manifest: dict[str, Any]) -> None:
    """No listed file is pickle-based: by suffix, by parsing its bytes as pickle opcodes (never
    unpickling), by .npy headers declaring object dtypes, and by the members of zips (.npz, .pt2)."""
    for entry in manifest["files"]:
        reason = pickle_reason(root / entry["path"])
        if reason:
            raise BundleRefused("pickle", f"{entry['path']} is pickle-based ({reason}); unpickling runs code, "
                                          "so bundles may hold only models (ONNX, OpenVINO IR, .tflite, "
                                          ".pte), safetensors and numeric .npy/.npz arrays.")


FILE_CHECKS: list[tuple[str, Callable[[Path, dict[str, Any]], None]]] = [
    ("paths", check_paths),
    ("file set", check_file_set),
    ("hashes", check_hashes),
    ("external data", check_external_data),
    ("pickle", check_no_pickle),
]


def verify_bundle(source: str | Path, policy: VerifyPolicy, *, validate: bool = True,
                  workdir: str | Path | None = None) -> VerifiedBundle:
    """Run every check on a bundle directory or tar archive; returns the VerifiedBundle or raises BundleRefused.

    An archive's metadata is verified first; then only its listed files are extracted into
    ``workdir`` (a temporary directory by default), each bounded by its signed size.
    """
    root = Path(source)
    if not root.exists():
        from compactai.errors import ModelNotFoundError

        raise ModelNotFoundError(f"Bundle not found: {root}.")
    if root.is_file():
        import tempfile

        target = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="compactai-bundle-"))
        stage_bundle(root, target, policy)
        root = target
    steps: list[str] = []
    manifest, signer = verify_metadata(*read_metadata(root), policy, steps)
    for name, check in FILE_CHECKS:
        check(root, manifest)
        steps.append(name)
    verified = VerifiedBundle(root, manifest, signer, steps)
    if validate:
        verified.validation = validate_model(root, manifest)
        steps.append("self-test")
    return verified


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    """Arrays of an .npz file, refusing object arrays (which would need pickle)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except ValueError as exc:
        raise BundleRefused("pickle", f"{path.name} holds object arrays, which need pickle; refused.") from exc


def validate_model(root: Path, manifest: dict[str, Any], threads: int = 1) -> dict[str, Any]:
    """ONNX checker, ONNX Runtime session, golden outputs within the signed tolerance.

    Returns {"max_abs_diff": {output: float}, "golden_samples": n}. Raises BundleRefused with
    reason ``invalid-model`` or ``golden-mismatch``.
    """
    import onnx
    import onnxruntime as ort

    check_manifest_paths(manifest)  # the model and golden files it opens must be listed files
    model_path = root / manifest["model"]
    runtime = manifest.get("runtime", "onnxruntime")
    if runtime == "openvino":
        return _validate_openvino(root, manifest, threads)
    if runtime in DEVICE_RUNTIMES:
        return _validate_device(root, manifest, runtime, threads)
    if runtime != "onnxruntime":
        raise BundleRefused("invalid-model", f"The bundle's model runs on {runtime!r}, which this verifier cannot "
                                             "run; verify it on a device with that runtime.")
    try:
        onnx.checker.check_model(str(model_path))
    except Exception as exc:
        raise BundleRefused("invalid-model", f"{manifest['model']} fails the ONNX checker "
                                             f"({str(exc).splitlines()[0][:200]}).") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise BundleRefused("invalid-model", f"ONNX Runtime cannot load {manifest['model']} "
                                             f"({str(exc).splitlines()[0][:200]}).") from exc
    golden = manifest["golden"]
    inputs = load_arrays(root / golden["inputs"])
    output_names = [o.name for o in session.get_outputs()]
    try:
        actual = dict(zip(output_names, session.run(output_names, inputs)))
    except Exception as exc:
        raise BundleRefused("golden-mismatch", f"The model fails on its golden inputs "
                                               f"({str(exc).splitlines()[0][:200]}).") from exc
    return compare_golden(root, manifest, inputs, actual)


def _validate_openvino(root: Path, manifest: dict[str, Any], threads: int) -> dict[str, Any]:
    """The self-test of an OpenVINO IR bundle, run in OpenVINO (the runtime it ships for)."""
    from compactai.measure.openvino import load_openvino

    return _self_test(root, manifest, "openvino", threads, lambda: load_openvino(root / manifest["model"]))


def _validate_device(root: Path, manifest: dict[str, Any], runtime: str, threads: int) -> dict[str, Any]:
    """The self-test of a .tflite/.pte bundle, run in LiteRT or ExecuTorch (the runtime it ships for),
    with the signature and conversion record the manifest carries."""
    from compactai.measure import runtime_plugin
    from compactai.measure.devices import load_device_model

    plugin = runtime_plugin(runtime)
    if not plugin.available():
        raise BundleRefused("runtime-unavailable", f"The bundle's model runs on {runtime}, which is not installed "
                                                   f"here, so its self-test cannot run; install it "
                                                   f"({plugin.install_line()}) or verify on the device.")
    signature = {"inputs": manifest["inputs"], "outputs": manifest["outputs"]}
    return _self_test(root, manifest, runtime, threads, lambda: load_device_model(
        root / manifest["model"], signature, manifest.get("conversion") or {}))


def _self_test(root: Path, manifest: dict[str, Any], runtime: str, threads: int,
               load: Callable[[], Any]) -> dict[str, Any]:
    """Run the golden inputs through ``load()``'s model in ``runtime`` and compare with the golden outputs."""
    from compactai.errors import CompactAIError
    from compactai.measure import make_runner

    try:
        handle = load()
        runner = make_runner(handle, runtime, threads)
    except CompactAIError as exc:  # not installed, or a file the runtime cannot read
        raise BundleRefused("invalid-model", f"{runtime} cannot run {manifest['model']}: {exc}") from exc
    inputs = load_arrays(root / manifest["golden"]["inputs"])
    try:
        actual = dict(zip(handle.output_names, runner.run(inputs)))
    except Exception as exc:  # any failure on the golden inputs refuses the bundle
        raise BundleRefused("golden-mismatch", f"The model fails on its golden inputs "
                                               f"({str(exc).splitlines()[0][:200]}).") from exc
    finally:
        getattr(runner, "close", lambda: None)()  # a device runtime's worker process
    result = compare_golden(root, manifest, inputs, actual)
    result["runtime"] = runtime
    return result


def compare_golden(root: Path, manifest: dict[str, Any], inputs: dict[str, np.ndarray],
                   actual: dict[str, np.ndarray]) -> dict[str, Any]:
    """Golden outputs within the signed tolerance; raises BundleRefused("golden-mismatch") otherwise."""
    golden = manifest["golden"]
    expected = load_arrays(root / golden["outputs"])
    rtol, atol = float(golden.get("rtol", 1e-3)), float(golden.get("atol", 1e-4))
    diffs: dict[str, float] = {}
    for name, want in expected.items():
        got = actual.get(name)
        if got is None or got.shape != want.shape:
            raise BundleRefused("golden-mismatch", f"Golden output {name!r} is missing or has shape "
                                                   f"{None if got is None else got.shape}, expected {want.shape}.")
        if not np.all(np.isfinite(got)):
            raise BundleRefused("golden-mismatch", f"The model returns NaN/Inf for golden output {name!r}.")
        diffs[name] = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0
        if not np.allclose(got, want, rtol=rtol, atol=atol):
            raise BundleRefused("golden-mismatch", f"Golden output {name!r} differs by up to {diffs[name]:.3g}, "
                                                   f"beyond the signed tolerance (rtol {rtol}, atol {atol}).")
    samples = next(iter(inputs.values())).shape[0] if inputs else 0
    return {"max_abs_diff": diffs, "golden_samples": int(samples)}
