"""Build a signed bundle from an ONNX file or a compactai output directory.

An output directory (from ``compactai quantize/prune/distill/optimize``) holds ``model.onnx``
and ``results.json``; its recipe, lineage, measured figures and quality travel into the
manifest, so a device knows what it runs and how it was made.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from compactai.bundle.manifest import (
    FORMAT,
    GOLDEN_INPUTS_FILE,
    GOLDEN_OUTPUTS_FILE,
    MANIFEST_FILE,
    METADATA_FILES,
    MODEL_FILE,
    OPENVINO_MODEL_FILE,
    RESERVED_FILES,
    SIGNATURE_FILE,
    BundleRefused,
    canonical_bytes,
    check_semver,
    file_entry,
    format_time,
    open_beneath,
    unsafe_path_reason,
)
from compactai.bundle.signing import Ed25519PrivateKey, key_id, sign
from compactai.errors import BadInputError, CorruptModelError, ModelNotFoundError, ParameterError
from compactai.models.handle import DEVICE_SUFFIXES

DEVICE_MODEL_FILES = tuple(f"model{suffix}" for suffix in DEVICE_SUFFIXES)

RESULTS_FILE = "results.json"
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# results.json sections that describe the model and travel into the manifest as they are
CARRIED_SECTIONS = ("recipe", "lineage", "baseline", "measurements", "quality", "budget", "task")


def find_source(source: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """(model.onnx path, results.json data or None) for an ONNX file or an output directory."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"Not found: {path}. Pass an .onnx file or a compactai output directory.")
    if path.is_dir():
        model = path / MODEL_FILE
        for other in (OPENVINO_MODEL_FILE, *DEVICE_MODEL_FILES):
            if not model.is_file() and (path / other).is_file():
                model = path / other  # an output directory whose model runs in OpenVINO, LiteRT or ExecuTorch
        if not model.is_file():
            raise BadInputError(f"{path} has no {MODEL_FILE}; pass an .onnx file or the output directory of "
                                "compactai quantize/prune/distill/optimize.")
        results_path = path / RESULTS_FILE
        results = json.loads(results_path.read_text()) if results_path.is_file() else None
        return model, results
    if path.suffix.lower() == ".xml":
        return path, None  # OpenVINO IR; read and checked by OpenVINO in _openvino_files
    if path.suffix.lower() in DEVICE_SUFFIXES:  # its signature is in the export's results.json beside it
        beside = path.parent / RESULTS_FILE
        return path, json.loads(beside.read_text()) if beside.is_file() else None
    if path.suffix.lower() != ".onnx":
        raise BadInputError(f"{path.name} is not a model file a bundle can hold: bundles hold ONNX, OpenVINO IR "
                            "(.xml), .tflite or .pte models. Export yours first (compactai export --format ...), "
                            "or pass an output directory.")
    from compactai.models.load import refuse_pickle

    refuse_pickle(path)  # a pickle named .onnx: say so, rather than "not a valid ONNX file"
    return path, None


def _model_files(model: Path) -> list[str]:
    """The external-data files of ``model`` (relative paths), checked before anything is copied or signed.

    Each ``location`` must be a plain relative path inside the model's directory, reached without
    any symlink (a link would copy and sign its target, e.g. ``model.onnx.data -> /etc/shadow``), be
    a regular file and not take a name the bundle writes itself. Then the ONNX checker runs on the
    source path, so the external data is checked too.
    """
    import onnx

    from compactai.bundle.verify import external_data_locations

    try:
        locations = sorted(set(external_data_locations(model)))
    except Exception as exc:  # onnx raises DecodeError and others: all mean "not ONNX"
        raise CorruptModelError(f"{model} is not a valid ONNX file ({str(exc).splitlines()[0][:200]}).") from exc
    for location in locations:
        reason = unsafe_path_reason(location)
        if not reason and location in RESERVED_FILES:
            reason = f"the bundle writes its own {location}"
        if not reason:
            try:
                os.close(open_beneath(model.parent, location))  # no symlink anywhere on the way, a regular file
            except BundleRefused as refusal:
                reason = _UNREADABLE.get(refusal.reason, str(refusal))
        if reason:
            raise BadInputError(f"{model} keeps external data at {location!r}, which cannot be bundled: {reason}. "
                                "Re-save the model with its data as regular files in its directory "
                                "(onnx.save(..., save_as_external_data=True, location='model.onnx.data')).")
    try:
        onnx.checker.check_model(str(model))  # by path: external data is checked as well
    except Exception as exc:  # ValidationError and others: all mean "invalid"
        raise CorruptModelError(f"{model} fails the ONNX checker ({str(exc).splitlines()[0][:200]}). "
                                "Re-export it.") from exc
    return locations


_UNREADABLE = {
    "symlink": "it is a symlink or lies under one (the bundle would carry the link's target)",
    "missing-file": "the file does not exist",
    "unsafe-path": "it is not a regular file",
}


def _copy_external_data(model: Path, location: str, work: Path) -> None:
    """Copy one external-data file, opened again without following links (it may have changed since the check)."""
    try:
        fd = open_beneath(model.parent, location)
    except BundleRefused as refusal:
        raise BadInputError(f"{model} keeps external data at {location!r}, which cannot be bundled: "
                            f"{_UNREADABLE.get(refusal.reason, str(refusal))}.") from refusal
    target = work / location
    target.parent.mkdir(parents=True, exist_ok=True)  # data in a subdirectory keeps its relative path
    with os.fdopen(fd, "rb") as source, target.open("xb") as out:
        shutil.copyfileobj(source, out, 1 << 20)


def _openvino_files(model: Path, work: Path) -> None:
    """Copy an OpenVINO IR (model.xml + model.bin, regular files reached without symlinks) into
    the bundle, after OpenVINO has read it."""
    from compactai.measure.openvino import load_openvino

    load_openvino(model)  # CorruptModelError when OpenVINO cannot read it
    for suffix in (".xml", ".bin"):
        try:
            fd = open_beneath(model.parent, model.with_suffix(suffix).name)
        except BundleRefused as refusal:
            raise BadInputError(f"{model.with_suffix(suffix)} cannot be bundled: "
                                f"{_UNREADABLE.get(refusal.reason, str(refusal))}.") from refusal
        with os.fdopen(fd, "rb") as source, (work / f"model{suffix}").open("xb") as out:
            shutil.copyfileobj(source, out, 1 << 20)


def _device_file(model: Path, work: Path) -> Path:
    """Copy a .tflite/.pte (a regular file reached without symlinks) into the bundle as model.<suffix>."""
    try:
        fd = open_beneath(model.parent, model.name)
    except BundleRefused as refusal:
        raise BadInputError(f"{model} cannot be bundled: {_UNREADABLE.get(refusal.reason, str(refusal))}.") from refusal
    target = work / f"model{model.suffix.lower()}"
    with os.fdopen(fd, "rb") as source, target.open("xb") as out:
        shutil.copyfileobj(source, out, 1 << 20)
    return target


def device_handle(model: Path, results: dict[str, Any] | None) -> Any:
    """The handle of a .tflite/.pte for its runtime's runner, from the export's results.json."""
    from compactai.measure.devices import load_device_model

    return load_device_model(model, (results or {}).get("model") or {}, (results or {}).get("conversion") or {})


def golden_pair(model: Path, inputs: dict[str, np.ndarray] | None, samples: int = 2,
                handle: Any = None) -> tuple[dict, dict]:
    """Golden inputs (given, or synthesized from the signature) and the model's outputs on them in
    ONNX Runtime, or in the runtime that runs it: OpenVINO for an IR, the device runtime for the
    .tflite/.pte ``handle``."""
    if model.suffix == ".xml" or handle is not None:
        from compactai.measure import make_runner
        from compactai.measure.openvino import load_openvino
        from compactai.models.load import synthesize_inputs as synthesize

        handle = handle if handle is not None else load_openvino(model)
        feeds = inputs if inputs is not None else synthesize(handle.inputs, batch=samples, seed=0)
        handle.check_feeds(feeds)
        runner = make_runner(handle, handle.framework, threads=1)
        try:
            outputs = dict(zip(handle.output_names, runner.run(feeds)))
        finally:
            getattr(runner, "close", lambda: None)()
        _check_finite(outputs)
        return {n: np.asarray(feeds[n]) for n in handle.input_names}, outputs
    import onnxruntime as ort

    from compactai.models.load import load_onnx, synthesize_inputs

    handle = load_onnx(model)
    feeds = inputs if inputs is not None else synthesize_inputs(handle.inputs, batch=samples, seed=0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), sess_options=options, providers=["CPUExecutionProvider"])
    handle.check_feeds(feeds)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, {n: feeds[n] for n in handle.input_names})))
    _check_finite(outputs)
    return {n: np.asarray(feeds[n]) for n in handle.input_names}, outputs


def _check_finite(outputs: dict[str, np.ndarray]) -> None:
    for name, value in outputs.items():
        if not np.all(np.isfinite(value)):
            raise BadInputError(f"The model returns NaN/Inf for output {name!r} on its golden inputs; pass other "
                                "golden inputs or fix the model before bundling it.")


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    for name, value in arrays.items():
        if value.dtype == object:
            raise BadInputError(f"Golden array {name!r} has dtype object; only numeric arrays are stored (no pickle).")
    with path.open("wb") as stream:
        np.savez(stream, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds like allow_pickle


def write_signed_manifest(root: Path, manifest: dict[str, Any], private_key: Ed25519PrivateKey) -> dict[str, Any]:
    """List every file under ``root`` in ``manifest['files']``, write manifest.json and its signature."""
    from compactai.bundle.verify import list_files

    manifest = dict(manifest)
    manifest["files"] = [file_entry(root, name) for name in sorted(list_files(root))]
    raw = canonical_bytes(manifest)
    (root / MANIFEST_FILE).write_bytes(raw)
    (root / SIGNATURE_FILE).write_bytes(sign(private_key, raw))
    return manifest


def build_bundle(
    source: str | Path,
    out: str | Path,
    private_key: Ed25519PrivateKey,
    version: int,
    *,
    semver: str | None = None,
    name: str | None = None,
    expires_days: float = 365.0,
    golden_inputs: dict[str, np.ndarray] | None = None,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    now: float | None = None,
    extra_files: dict[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Write a signed bundle (a directory, or a tar archive if ``out`` ends in .tar/.tar.gz); returns the manifest.

    ``extra_files`` ({name in the bundle: source path}, e.g. the drift profile) are copied into the
    bundle root and listed, hashed and signed like the model."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ParameterError(f"The 'version' of a bundle must be an integer >= 1. Got {version!r} instead.")
    if not expires_days > 0:
        raise ParameterError(f"The 'expires_days' of a bundle must be > 0. Got {expires_days!r} instead.")
    for label, tolerance in (("rtol", rtol), ("atol", atol)):
        if not 0 <= tolerance < 1:
            raise ParameterError(f"The '{label}' of the golden self-test must be in [0, 1). Got {tolerance!r} instead.")
    semver = check_semver(semver or f"0.{version}.0")
    model, results = find_source(source)
    out_path = Path(out)
    if out_path.exists():
        raise BadInputError(f"{out_path} already exists; bundles are never overwritten. Choose a new -o path.")
    archive = out_path.name.endswith(ARCHIVE_SUFFIXES)
    openvino = model.suffix.lower() == ".xml"
    device = DEVICE_SUFFIXES.get(model.suffix.lower())  # litert | executorch | None
    external = [] if openvino or device else _model_files(model)  # before anything is written
    handle = device_handle(model, results) if device else None  # BadInputError without the export's record
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out_path.parent))
    try:
        model_file = OPENVINO_MODEL_FILE if openvino else MODEL_FILE
        if openvino:
            _openvino_files(model, work)
        elif handle is not None:
            model_file = _device_file(model, work).name
            handle = handle.derive(path=work / model_file)
        else:
            shutil.copyfile(model, work / MODEL_FILE)
        for location in external:
            _copy_external_data(model, location, work)
        _copy_extra_files(work, extra_files or {})
        inputs, outputs = golden_pair(work / model_file, golden_inputs, handle=handle)
        signature = _signature(work / model_file) if handle is None else (
            [s.to_dict() for s in handle.inputs], [s.to_dict() for s in handle.outputs])
        save_arrays(work / GOLDEN_INPUTS_FILE, inputs)
        save_arrays(work / GOLDEN_OUTPUTS_FILE, outputs)
        created = time.time() if now is None else now
        manifest = {
            "format": FORMAT,
            "name": name or (results or {}).get("model", {}).get("name") or model.stem,
            "version": version,
            "semver": semver,
            "created": format_time(created),
            "expires": format_time(created + expires_days * 86400),
            "model": model_file,
            # the runtime that runs it (and its self-test)
            "runtime": "openvino" if openvino else device or "onnxruntime",
            # a device model's conversion (input shapes, static batch): what its runner needs besides the file
            **({"conversion": (results or {}).get("conversion")} if device else {}),
            "inputs": signature[0],
            "outputs": signature[1],
            "golden": {"inputs": GOLDEN_INPUTS_FILE, "outputs": GOLDEN_OUTPUTS_FILE, "rtol": rtol, "atol": atol},
            "signed_by": key_id(private_key.public_key()),
            "source": _source_info(model, results),
            **{key: (results or {}).get(key) for key in CARRIED_SECTIONS if (results or {}).get(key) is not None},
        }
        manifest = write_signed_manifest(work, manifest, private_key)
        if archive:
            _write_archive(work, out_path)
        else:
            os.replace(work, out_path)
        return manifest
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _copy_extra_files(work: Path, extra_files: dict[str, str | Path]) -> None:
    for rel, src in extra_files.items():
        reason = unsafe_path_reason(rel)
        if not reason and (rel in (GOLDEN_INPUTS_FILE, GOLDEN_OUTPUTS_FILE, MANIFEST_FILE, SIGNATURE_FILE)
                           or (work / rel).exists()):
            reason = "a bundle file has that name"
        if reason:
            raise BadInputError(f"Cannot add extra file {rel!r} to the bundle: {reason}. Choose another name.")
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, work / rel)


def _signature(model: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from compactai.measure.openvino import load_openvino
    from compactai.models.load import load_onnx

    handle = load_openvino(model) if model.suffix == ".xml" else load_onnx(model)
    return [s.to_dict() for s in handle.inputs], [s.to_dict() for s in handle.outputs]


def _source_info(model: Path, results: dict[str, Any] | None) -> dict[str, Any]:
    info: dict[str, Any] = {"model_file": model.name}
    if results:
        info.update({k: results.get(k) for k in ("command", "created", "seed") if k in results})
        info["fingerprint"] = results.get("model", {}).get("fingerprint")
        env = results.get("environment") or {}
        info["environment"] = {k: env[k] for k in ("cpu", "versions", "python") if k in env}
    return info


def write_archive(root: Path, out: Path) -> None:
    """Write the bundle directory ``root`` as the tar archive ``out`` (deterministic, see _write_archive)."""
    _write_archive(root, out)


def _write_archive(root: Path, out: Path) -> None:
    """A tar of the bundle: the signed metadata first (a verifier reads only the first entries for it),
    then sorted names; no owner, fixed mode, written via a temp file then renamed."""
    tmp = out.with_name(out.name + ".tmp")
    compressed = out.name.endswith((".tar.gz", ".tgz"))
    files = [p for p in root.rglob("*") if p.is_file()]
    order = {name: i for i, name in enumerate(METADATA_FILES)}
    with (tarfile.open(tmp, "w:gz") if compressed else tarfile.open(tmp, "w")) as tar:
        for path in sorted(files, key=lambda p: (order.get(p.relative_to(root).as_posix(), len(order)), p)):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(root).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with path.open("rb") as stream:
                tar.addfile(info, stream)
    os.replace(tmp, out)
