"""The bundle manifest: what a signed bundle holds, as plain data, and its canonical bytes.

A bundle is a directory (or a tar archive of one)::

    manifest.json        this manifest, canonical JSON (the bytes that are signed)
    manifest.json.sig    detached Ed25519 signature over those bytes (JSON: key_id, signature)
    model.onnx           the model (+ model.onnx.data when its weights are external)
    golden_inputs.npz    inputs for the self-test (numeric arrays, loaded with allow_pickle=False)
    golden_outputs.npz   the outputs the model must reproduce on them, within the signed tolerance

The manifest lists every other file with its size and SHA-256, so a verifier knows the exact
file set before it opens anything.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path, PurePosixPath
from typing import Any

from compactai.errors import SecurityError

FORMAT = "compactai-bundle/1"
MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.json.sig"
MODEL_FILE = "model.onnx"
GOLDEN_INPUTS_FILE = "golden_inputs.npz"
GOLDEN_OUTPUTS_FILE = "golden_outputs.npz"
METADATA_FILES = (MANIFEST_FILE, SIGNATURE_FILE)
MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # a manifest is metadata; refuse anything bigger before parsing
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
    for key in ("created", "expires"):
        parse_time(data[key], key)
    return data


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
