"""Authenticate a bundle's metadata first, then stage only the files it lists.

Nothing a bundle holds is copied or extracted before its manifest's signature, expiry and version
have been checked, and then only the files the manifest lists, each no larger than its signed size:

* a **directory**: ``manifest.json`` and its signature are read (bounded, never through a symlink)
  and verified; the directory's names are scanned without reading any file, and an unlisted file
  refuses the bundle (``extra-file``); each listed file is opened without following links and
  copied up to its signed size.
* a **tar archive** (plain, gzip, bzip2 or xz): the stream is read for ``manifest.json`` and its
  signature within the first ``METADATA_SCAN_MEMBERS`` entries and ``METADATA_SCAN_BYTES`` expanded
  bytes (the builder writes them first); once they verify, a second pass extracts only listed
  members and refuses any that is unlisted, repeated, a link, or larger than signed. The expanded
  stream is cut off at the signed sizes plus header room, so a gzip bomb stops at that bound.

The later checks (:mod:`compactai.bundle.verify`) then run on the staged copy.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import stat
import tarfile
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from compactai.bundle.manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    METADATA_FILES,
    SIGNATURE_FILE,
    BundleRefused,
    named_paths,
    open_beneath,
    parse_manifest,
    parse_time,
    unsafe_path_reason,
)
from compactai.bundle.signing import Ed25519PublicKey, verify_signature

METADATA_SCAN_MEMBERS = 64  # archive entries read while looking for the manifest and its signature
METADATA_SCAN_BYTES = 64 * 1024**2  # expanded bytes read while looking for them
HEADER_ROOM = 64 * 1024  # per entry, for tar/PAX/GNU headers, padding and tarfile's read-ahead
COPY_CHUNK = 1 << 20
METADATA_LIMITS = {MANIFEST_FILE: MAX_MANIFEST_BYTES, SIGNATURE_FILE: MAX_SIGNATURE_BYTES}


@dataclass
class VerifyPolicy:
    """What a verifier trusts: its keys, the clock, the highest version seen, the block-list."""

    trusted_keys: list[Ed25519PublicKey]
    now: float | None = None
    highest_trusted: int = 0  # a bundle must be strictly newer than this
    blocked: dict[int, str] = field(default_factory=dict)

    def clock(self) -> float:
        return time.time() if self.now is None else self.now


def _read_small(root: Path, name: str, limit: int) -> bytes | None:
    """At most ``limit`` + 1 bytes of ``root/name`` (None if absent), never through a symlink."""
    try:
        fd = open_beneath(root, name)
    except BundleRefused as refusal:
        if refusal.reason == "missing-file":
            return None
        raise
    with os.fdopen(fd, "rb") as stream:
        return stream.read(limit + 1)


def read_metadata(root: Path) -> tuple[bytes, bytes | None]:
    """manifest.json and manifest.json.sig bytes of a bundle directory (sig None if absent), size-bounded."""
    manifest = _read_small(root, MANIFEST_FILE, MAX_MANIFEST_BYTES)
    if manifest is None:
        raise BundleRefused("missing-manifest", f"{root} has no manifest.json; it is not a compactai bundle.")
    signature = _read_small(root, SIGNATURE_FILE, MAX_SIGNATURE_BYTES)
    _check_metadata_sizes(manifest, signature)
    return manifest, signature


def _check_metadata_sizes(manifest: bytes, signature: bytes | None) -> None:
    for name, data in ((MANIFEST_FILE, manifest), (SIGNATURE_FILE, signature)):
        if data is not None and len(data) > METADATA_LIMITS[name]:
            raise BundleRefused("oversize", f"{name} is over {METADATA_LIMITS[name]} bytes; refusing to parse it.")


def verify_metadata(manifest_bytes: bytes, signature: bytes | None, policy: VerifyPolicy,
                    steps: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """Checks 1-3 (signature, expiry, version) on the metadata alone; returns (manifest, key id).

    The update agent runs these before fetching or copying any model file, so an unsigned, stale
    or old manifest costs no download and no disk.
    """
    steps = [] if steps is None else steps
    signer = verify_signature(manifest_bytes, signature, policy.trusted_keys)
    manifest = parse_manifest(manifest_bytes)
    steps.append("signature")
    expires = parse_time(manifest["expires"], "expires")
    if policy.clock() > expires:
        raise BundleRefused("expired", f"The manifest of {manifest['name']} v{manifest['version']} expired at "
                                       f"{manifest['expires']}; ask the publisher for a freshly signed bundle.")
    steps.append("expiry")
    version = int(manifest["version"])
    if version in policy.blocked:
        raise BundleRefused("blocked", f"Version {version} is block-listed on this device "
                                       f"({policy.blocked[version]}).")
    if version <= policy.highest_trusted:
        raise BundleRefused("rollback", f"Version {version} is not newer than version {policy.highest_trusted}, "
                                        "the highest this device has trusted; older bundles are refused.")
    steps.append("version")
    return manifest, signer


def check_manifest_paths(manifest: dict[str, Any]) -> None:
    """Every path the manifest names is a safe relative path, and the model and golden files are listed files.

    Runs before any of these names is used, so a signed ``"/etc/x"`` or ``"../../x"`` is never opened.
    """
    listed = [entry["path"] for entry in manifest["files"]]
    for path in listed:
        reason = unsafe_path_reason(path)
        if reason or path in METADATA_FILES:
            raise BundleRefused("unsafe-path", f"The manifest lists the path {path!r}, which is not "
                                               f"allowed: {reason or 'it names a metadata file'}.")
    if len(listed) != len(set(listed)):
        raise BundleRefused("bad-manifest", "The manifest lists a file twice.")
    for role, path in named_paths(manifest).items():
        reason = unsafe_path_reason(path)
        if reason or path not in listed:
            raise BundleRefused("unsafe-path", f"The manifest names {path!r} as its {role}, which is not allowed: "
                                               f"{reason or 'it is not one of the files the manifest lists and checks'}.")


def stage_bundle(source: Path, target: Path, policy: VerifyPolicy) -> tuple[dict[str, Any], str]:
    """Verify the metadata of the bundle at ``source`` (directory or tar archive), then put its listed files
    and metadata into ``target``; returns (manifest, key id). Raises BundleRefused."""
    target.mkdir(parents=True, exist_ok=True)
    directory = source.is_dir()
    manifest_bytes, signature = read_metadata(source) if directory else read_archive_metadata(source)
    # the raw metadata is small and bounded; written first so a refusal can still log what was claimed
    (target / MANIFEST_FILE).write_bytes(manifest_bytes)
    if signature is not None:
        (target / SIGNATURE_FILE).write_bytes(signature)
    manifest, signer = verify_metadata(manifest_bytes, signature, policy)
    check_manifest_paths(manifest)
    if directory:
        _copy_listed(source, target, manifest)
    else:
        _extract_listed(source, target, manifest)
    return manifest, signer


# ---- directories -----------------------------------------------------------------------------------------
def _refuse_unlisted(root: Path, manifest: dict[str, Any]) -> None:
    """Scan names only (no file is read): any symlink, special file, unlisted file or directory refuses."""
    listed = {entry["path"] for entry in manifest["files"]}
    directories = {parent.as_posix() for path in listed for parent in PurePosixPath(path).parents} - {"."}
    pending = [""]
    while pending:
        prefix = pending.pop()
        with os.scandir(root / prefix if prefix else root) as entries:
            for entry in entries:
                name = f"{prefix}/{entry.name}" if prefix else entry.name
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISLNK(mode):
                    raise BundleRefused("symlink", f"{name} is a symlink; bundles may not contain symlinks.")
                if stat.S_ISDIR(mode) and name in directories:
                    pending.append(name)
                elif stat.S_ISREG(mode) and (name in listed or (not prefix and name in METADATA_FILES)):
                    continue
                elif stat.S_ISREG(mode) or stat.S_ISDIR(mode):
                    raise BundleRefused("extra-file", f"The bundle holds {name}, which the manifest does not list; "
                                                      "nothing was copied.")
                else:
                    raise BundleRefused("unsafe-path", f"{name} is not a regular file.")


def _copy_listed(source: Path, target: Path, manifest: dict[str, Any]) -> None:
    _refuse_unlisted(source, manifest)
    for entry in manifest["files"]:
        fd = open_beneath(source, entry["path"])
        with os.fdopen(fd, "rb") as stream:
            size = os.fstat(fd).st_size
            if size != entry["size"]:
                raise BundleRefused("hash-mismatch", f"{entry['path']} is {size} bytes; the manifest signs "
                                                     f"{entry['size']} bytes.")
            _copy(stream, target / entry["path"], entry["size"], entry["path"])


def _copy(stream: _Readable, path: Path, size: int, what: str) -> None:
    """Copy exactly ``size`` bytes into a new file ``path``; refuse a stream that is shorter or longer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("xb") as out:
        remaining = size
        while remaining:
            block = stream.read(min(COPY_CHUNK, remaining))
            if not block:
                raise BundleRefused("hash-mismatch", f"{what} ended before the {size} bytes the manifest signs.")
            out.write(block)
            remaining -= len(block)
        if stream.read(1):
            raise BundleRefused("hash-mismatch", f"{what} holds more than the {size} bytes the manifest signs.")


# ---- archives --------------------------------------------------------------------------------------------
class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _BudgetSpent(Exception):
    """The expanded stream of an archive went past the bytes it may use."""


class _BoundedReader:
    """A read-only stream that refuses to return more than ``budget`` bytes of ``stream`` in total."""

    def __init__(self, stream: _Readable, budget: int) -> None:
        self.stream, self.remaining = stream, budget

    def read(self, size: int = -1) -> bytes:
        if self.remaining <= 0:
            raise _BudgetSpent
        wanted = self.remaining if size is None or size < 0 else min(size, self.remaining)
        data = self.stream.read(wanted)
        self.remaining -= len(data)
        return data


def _expanded(raw: io.BufferedReader) -> io.BufferedIOBase:
    """The decompressed stream of a (possibly compressed) tar file, chosen by its magic bytes."""
    magic = raw.read(6)
    raw.seek(0)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if magic.startswith(b"BZh"):
        return bz2.BZ2File(raw)
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw)
    return raw


@contextmanager
def _tar_stream(archive: Path, budget: int) -> Iterator[tarfile.TarFile]:
    """The archive as a forward-only tar stream whose expanded bytes are capped at ``budget``.

    Decompression happens below the cap, so neither member data nor tarfile's own header reads
    (PAX records, GNU long names) can expand past it. Malformed data refuses with ``bad-archive``.
    """
    with ExitStack() as stack:
        try:
            reader = _BoundedReader(stack.enter_context(_expanded(stack.enter_context(archive.open("rb")))), budget)
            yield stack.enter_context(tarfile.open(fileobj=reader, mode="r|"))  # type: ignore[call-overload]
        except BundleRefused:
            raise
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
            raise BundleRefused("bad-archive", f"{archive.name} is not a readable tar archive "
                                               f"({str(exc).splitlines()[0][:200] or type(exc).__name__}).") from exc


def _member_name(member: tarfile.TarInfo) -> str:
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    return name.rstrip("/")


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    source = tar.extractfile(member)
    if source is None:  # only regular files reach here; tarfile returns None for others
        raise BundleRefused("unsafe-path", f"Archive entry {member.name!r} is not a regular file.")
    with source:
        return source.read(member.size)


def read_archive_metadata(archive: Path) -> tuple[bytes, bytes | None]:
    """manifest.json and manifest.json.sig from the first entries of a tar archive (sig None if not found)."""
    found: dict[str, bytes] = {}
    try:
        with _tar_stream(archive, METADATA_SCAN_BYTES) as tar:
            for count, member in enumerate(tar):
                name = _member_name(member)
                if count >= METADATA_SCAN_MEMBERS or member.offset_data + member.size > METADATA_SCAN_BYTES:
                    break  # the builder writes the metadata first; do not expand what comes after
                if name not in METADATA_LIMITS:
                    continue
                if name in found:
                    raise BundleRefused("bad-archive", f"Archive entry {name!r} appears twice.")
                if not member.isfile():
                    raise BundleRefused("symlink" if member.issym() or member.islnk() else "unsafe-path",
                                        f"Archive entry {member.name!r} is not a regular file.")
                if member.size > METADATA_LIMITS[name]:
                    raise BundleRefused("oversize", f"{name} is over {METADATA_LIMITS[name]} bytes; refusing to "
                                                    "parse it.")
                found[name] = _read_member(tar, member)
                if len(found) == len(METADATA_LIMITS):
                    break
    except _BudgetSpent:
        pass  # the scan bound: what was found so far is all there is
    if MANIFEST_FILE not in found:
        raise BundleRefused("missing-manifest", f"{archive.name} has no manifest.json among its first "
                                                f"{METADATA_SCAN_MEMBERS} entries and {METADATA_SCAN_BYTES >> 20} MiB; "
                                                "it is not a compactai bundle.")
    return found[MANIFEST_FILE], found.get(SIGNATURE_FILE)


def _extract_listed(archive: Path, target: Path, manifest: dict[str, Any]) -> None:
    """Second pass over an archive whose metadata verified: extract the listed files, nothing else."""
    sizes = {entry["path"]: int(entry["size"]) for entry in manifest["files"]}
    directories = {parent.as_posix() for path in sizes for parent in PurePosixPath(path).parents} - {"."}
    entries = len(sizes) + len(METADATA_FILES) + len(directories) + 1
    budget = sum(sizes.values()) + MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES + entries * HEADER_ROOM
    seen: set[str] = set()
    try:
        with _tar_stream(archive, budget) as tar:
            for member in tar:
                name = _member_name(member)
                if name in seen:
                    raise BundleRefused("bad-archive", f"Archive entry {member.name!r} appears twice.")
                seen.add(name)
                if not name:
                    continue  # the archive's "./" entry
                reason = unsafe_path_reason(name)
                if reason:
                    raise BundleRefused("unsafe-path", f"Archive entry {member.name!r} is not allowed: {reason}.")
                if member.issym() or member.islnk():
                    raise BundleRefused("symlink", f"Archive entry {member.name!r} is a link; bundles may not "
                                                   "contain links.")
                if not (member.isfile() or member.isdir()):
                    raise BundleRefused("unsafe-path", f"Archive entry {member.name!r} is not a regular file.")
                if name in METADATA_FILES or (member.isdir() and name in directories):
                    continue  # the verified metadata is already staged; directories are made for their files
                if name not in sizes or member.isdir():
                    raise BundleRefused("extra-file", f"The archive holds {name}, which the manifest does not "
                                                      "list; it was not extracted.")
                if member.size > sizes[name]:
                    raise BundleRefused("oversize", f"Archive entry {name} is {member.size} bytes, more than the "
                                                    f"{sizes[name]} bytes signed; it was not extracted.")
                source = tar.extractfile(member)
                assert source is not None  # isfile() members always have data
                with source:
                    _copy(source, target / name, member.size, name)
    except _BudgetSpent as exc:
        raise BundleRefused("oversize", f"{archive.name} expands beyond the {budget} bytes its manifest allows; "
                                        "refused.") from exc
    missing = sorted(set(sizes) - seen)
    if missing:
        raise BundleRefused("missing-file", f"The bundle lacks file(s) the manifest lists: {missing}.")
