"""The bundle manifest: what a signed bundle holds, as plain data, and its canonical bytes.

A bundle is a directory (or a tar archive of one)::

    manifest.json        this manifest, canonical JSON (the bytes that are signed)
    manifest.json.sig    detached Ed25519 signature over those bytes (JSON: key_id, signature)
    model.onnx           the model (+ model.onnx.data when its weights are external), or
    model.xml + model.bin  an OpenVINO IR (the manifest's "runtime" says which runtime runs it)
    golden_inputs.npz    inputs for the self-test (numeric arrays, loaded with allow_pickle=False)
    golden_outputs.npz   the outputs the model must reproduce on them, within the signed tolerance

The manifest lists every other file with its size and SHA-256, so a verifier knows the exact
file set before it opens anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import time
from pathlib import Path, PurePosixPath
from typing import Any

from compactai.errors import SecurityError

FORMAT = "compactai-bundle/1"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.json.sig"
MODEL_FILE = "model.onnx"
OPENVINO_MODEL_FILE = "model.xml"  # an OpenVINO IR bundle: model.xml + model.bin, manifest "runtime": "openvino"
GOLDEN_INPUTS_FILE = "golden_inputs.npz"
GOLDEN_OUTPUTS_FILE = "golden_outputs.npz"
METADATA_FILES = (MANIFEST_FILE, SIGNATURE_FILE)
# names the bundle itself writes: a model's external data may not take them
RESERVED_FILES = (MANIFEST_FILE, SIGNATURE_FILE, MODEL_FILE, GOLDEN_INPUTS_FILE, GOLDEN_OUTPUTS_FILE)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # a manifest is metadata; refuse anything bigger before parsing
MAX_SIGNATURE_BYTES = 4096  # the signature file is a small JSON document
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_SEMVER = re.compile(r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.+-]+)?$")
REQUIRED_KEYS = ("format", "name", "version", "semver", "created", "expires", "model", "files", "golden")


class BundleRefused(SecurityError):
    """A bundle failed one verification step. ``reason`` is a short stable code for logs and counters."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def canonical_bytes(data: dict[str, Any]) -> bytes:
    """The one byte form of a manifest: sorted keys, 2-space indent, ASCII, trailing newline."""
    return (json.dumps(data, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n").encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise BundleRefused("bad-manifest", f"manifest.json has duplicate keys {dup}; it is malformed.")
    return dict(pairs)


def parse_manifest(raw: bytes) -> dict[str, Any]:
    """Parse manifest bytes strictly (no duplicate keys, no NaN, required keys with the right types)."""

    def no_constants(name: str) -> Any:
        raise BundleRefused("bad-manifest", f"manifest.json contains {name}, which is not valid JSON.")

    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleRefused("bad-manifest", f"manifest.json is not valid JSON ({exc}).") from exc
    if not isinstance(data, dict):
        raise BundleRefused("bad-manifest", "manifest.json must hold a JSON object.")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise BundleRefused("bad-manifest", f"manifest.json lacks the required key(s) {missing}.")
    if data["format"] != FORMAT:
        raise BundleRefused("bad-manifest", f"Unknown bundle format {data['format']!r}; this reader knows {FORMAT!r}.")
    if not isinstance(data["version"], int) or isinstance(data["version"], bool) or data["version"] < 1:
        raise BundleRefused("bad-manifest", f"The manifest version must be an integer >= 1. Got {data['version']!r}.")
    if not isinstance(data["files"], list) or not all(
        isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("size"), int)
        and isinstance(f.get("sha256"), str) for f in data["files"]
    ):
        raise BundleRefused("bad-manifest", "manifest.json 'files' must be a list of {path, size, sha256}.")
    golden = data["golden"]
    if not isinstance(data["model"], str) or not isinstance(golden, dict) or not all(
        isinstance(golden.get(k), str) for k in ("inputs", "outputs")
    ) or not all(isinstance(golden.get(k, 0.0), int | float) and not isinstance(golden.get(k), bool)
                 for k in ("rtol", "atol")):
        raise BundleRefused("bad-manifest", "manifest.json 'model' must be a path and 'golden' an object "
                                            "{inputs: path, outputs: path, rtol: number, atol: number}.")
    for key in ("created", "expires"):
        parse_time(data[key], key)
    return data


def named_paths(manifest: dict[str, Any]) -> dict[str, str]:
    """Every path a (parsed) manifest names besides its file list, by role: each must be a listed file."""
    golden = manifest["golden"]
    return {"model": manifest["model"], "golden inputs": golden["inputs"], "golden outputs": golden["outputs"]}


def parse_time(text: Any, what: str = "time") -> float:
    """Seconds since the epoch from the manifest's UTC time form (``2026-01-31T12:00:00Z``)."""
    import calendar

    try:
        return float(calendar.timegm(time.strptime(str(text), TIME_FORMAT)))
    except ValueError as exc:
        raise BundleRefused("bad-manifest", f"The manifest '{what}' must look like 2026-01-31T12:00:00Z. "
                                            f"Got {text!r}.") from exc


def format_time(seconds: float) -> str:
    return time.strftime(TIME_FORMAT, time.gmtime(seconds))


def check_semver(text: str) -> str:
    from compactai.errors import ParameterError

    if not _SEMVER.match(text):
        raise ParameterError(f"The 'semver' of a bundle must look like 1.2.3 (optionally -rc.1). Got {text!r} instead.")
    return text


def unsafe_path_reason(path: str) -> str | None:
    """Why ``path`` (a manifest or archive entry) may not be used, or None if it is a safe relative path."""
    if not path or "\\" in path or "\x00" in path:
        return "it is empty or holds a backslash or NUL"
    pure = PurePosixPath(path)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", path):
        return "it is absolute"
    if any(part in ("..", ".", "") for part in path.split("/")):
        return "it holds '..' or '.' or an empty part"
    return None


def open_beneath(root: Path, relative: str) -> int:
    """A read-only descriptor of the regular file ``root/relative``, reached without following any symlink.

    Each directory on the way is opened with O_NOFOLLOW relative to the previous one, so a link
    swapped in after a check cannot redirect the read. ``relative`` must already be a safe path
    (see :func:`unsafe_path_reason`). Raises BundleRefused: ``symlink``, ``missing-file`` or
    ``unsafe-path`` (not a regular file); the caller owns (and closes) the descriptor.
    """
    parts = relative.split("/")
    directory_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused below as not a regular file
    file_flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            try:
                fd = os.open(part, directory_flags if i < len(parts) - 1 else file_flags, dir_fd=dir_fd)
            except OSError as exc:
                raise _refusal(relative, part, dir_fd, exc) from exc
            os.close(dir_fd)
            dir_fd = fd
    except BaseException:
        os.close(dir_fd)
        raise
    if not stat.S_ISREG(os.fstat(dir_fd).st_mode):
        os.close(dir_fd)
        raise BundleRefused("unsafe-path", f"{relative} is not a regular file.")
    return dir_fd


def _refusal(relative: str, part: str, dir_fd: int, exc: OSError) -> BundleRefused:
    if exc.errno == errno.ENOENT:
        return BundleRefused("missing-file", f"{relative} does not exist.")
    try:
        is_link = stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        is_link = False
    if is_link or exc.errno == errno.ELOOP:
        return BundleRefused("symlink", f"{relative} is a symlink or lies under one; bundles may not "
                                        "contain symlinks.")
    return BundleRefused("unsafe-path", f"{relative} cannot be opened as a regular file ({exc.strerror}).")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, relative: str) -> dict[str, Any]:
    path = root / relative
    return {"path": relative, "size": path.stat().st_size, "sha256": sha256_file(path)}


def signed_size(manifest: dict[str, Any], path: str) -> int | None:
    """The size the manifest promises for ``path`` (None if the file is not listed)."""
    for entry in manifest["files"]:
        if entry["path"] == path:
            return int(entry["size"])
    return None
