"""The publisher's side of a fleet repository: TUF metadata written with python-tuf's Metadata API.

Four roles, each with its own keys and threshold (see docs/fleet.md for what each protects against):
root (offline; names every role's keys), targets (offline; which bundle is the newest for a model
and channel), snapshot and timestamp (online; the consistent set of metadata and its freshness).
Every change writes new versioned files first and ``timestamp.json`` last (an atomic rename), so a
web server may serve the directory while it changes; a device sees the old or the new repository.

    repo = Repository.init("repo", root=[k1], targets=[kt], snapshot=[ks], timestamp=[kts])
    repo.add_bundle("bundle-v2.tar", [publisher_pub], signers=[kt])
    repo.refresh_timestamp()                      # cron: the online timestamp key is on file
"""

from __future__ import annotations

import copy
import fcntl
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar, cast

from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from compactai.bundle.build import write_archive
from compactai.bundle.signing import Ed25519PublicKey
from compactai.bundle.verify import VerifyPolicy, verify_bundle
from compactai.errors import BadInputError, ModelNotFoundError, ParameterError
from compactai.fleet.keys import FleetKey, load_keys
from compactai.fleet.layout import (
    CUSTOM_KEY,
    DEFAULT_CHANNEL,
    DEFAULT_EXPIRES,
    METADATA_DIR,
    ONLINE_ROLES,
    PUBLISHER_FILE,
    ROLES,
    TARGETS_DIR,
    check_name,
    parse_duration,
    target_path,
)

_SERIALIZER = JSONSerializer(compact=False)
LOCK_FILE = ".publisher.lock"
F = TypeVar("F", bound=Callable[..., Any])


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, 0o644)  # served files: world-readable, whatever the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _exclusive(method: F) -> F:
    """Run a method that changes the repository under the publisher's lock (see Repository._changing)."""
    @functools.wraps(method)
    def locked(self: Repository, *args: Any, **kwargs: Any) -> Any:
        with self._changing():
            return method(self, *args, **kwargs)

    return cast(F, locked)


class Repository:
    """An existing repository directory; every method that changes it re-signs and writes what changed."""

    def __init__(self, path: str | Path, signers: list[FleetKey] | None = None, *, now: datetime | None = None) -> None:
        self.path = Path(path)
        self.metadata_dir = self.path / METADATA_DIR
        self.now = now
        if not (self.metadata_dir / "root.json").is_file():
            raise ModelNotFoundError(f"{self.path} is not a fleet repository (no {METADATA_DIR}/root.json); "
                                     "create one with: compactai repo init")
        publisher = self.path / PUBLISHER_FILE
        settings = json.loads(publisher.read_text()) if publisher.is_file() else {}
        self.settings: dict[str, Any] = {**settings, "expires": {**DEFAULT_EXPIRES, **settings.get("expires", {})}}
        self._load()
        self._given = list(signers or [])
        self._online: list[FleetKey] | None = None
        self._lock_fd: int | None = None

    def _load(self) -> None:
        self.root: Metadata[Root] = Metadata.from_file(str(self.metadata_dir / "root.json"))
        self.targets: Metadata[Targets] = Metadata.from_file(str(self.metadata_dir / "targets.json"))
        self.snapshot: Metadata[Snapshot] = Metadata.from_file(str(self.metadata_dir / "snapshot.json"))
        self.timestamp: Metadata[Timestamp] = Metadata.from_file(str(self.metadata_dir / "timestamp.json"))

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """One publisher at a time (a cron refresh-timestamp and an add must not both sign version N+1):
        an flock on REPO/.publisher.lock, released by the kernel if we die; the metadata is re-read
        under it."""
        if self._lock_fd is not None:
            yield
            return
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd = fd
            self._load()
            yield
        finally:
            self._lock_fd = None
            os.close(fd)

    # ---- creation ----------------------------------------------------------------------------------------
    @classmethod
    def init(cls, path: str | Path, *, root: list[FleetKey], targets: list[FleetKey], snapshot: list[FleetKey],
             timestamp: list[FleetKey], thresholds: dict[str, int] | None = None,
             expires: dict[str, str] | None = None, now: datetime | None = None) -> Repository:
        """Create the metadata of an empty repository in ``path`` (which must not hold one yet)."""
        base = Path(path)
        if (base / METADATA_DIR / "root.json").exists():
            raise BadInputError(f"{base} already holds a fleet repository; use compactai repo rotate to change keys.")
        periods = {**DEFAULT_EXPIRES, **(expires or {})}
        for role, period in periods.items():
            parse_duration(period, f"expiry of the {role} role")
        members = {"root": root, "targets": targets, "snapshot": snapshot, "timestamp": timestamp}
        root_md = Metadata(Root(expires=_utc(now), consistent_snapshot=True))
        for role, keys in members.items():
            threshold = (thresholds or {}).get(role, 1)
            _check_threshold(role, threshold, len(keys))
            for key in keys:
                root_md.signed.add_key(key.key, role)
            root_md.signed.roles[role].threshold = threshold
        online = {role: [str(k.path) for k in members[role] if k.signer is not None and k.path] for role in ONLINE_ROLES}
        settings = {"format": "compactai-fleet/1", "expires": periods, "online_keys": online}
        (base / METADATA_DIR).mkdir(parents=True, exist_ok=True)
        (base / TARGETS_DIR).mkdir(parents=True, exist_ok=True)
        _atomic_write(base / PUBLISHER_FILE, (json.dumps(settings, indent=2) + "\n").encode())
        repo = object.__new__(cls)
        repo.path, repo.metadata_dir, repo.now, repo.settings = base, base / METADATA_DIR, now, settings
        repo._given, repo._online, repo._lock_fd = [k for keys in members.values() for k in keys], None, None
        repo.root = root_md
        repo.targets = Metadata(Targets(expires=_utc(now)))
        repo.snapshot = Metadata(Snapshot(expires=_utc(now)))
        repo.timestamp = Metadata(Timestamp(expires=_utc(now)))
        for md in (repo.targets, repo.snapshot, repo.timestamp):
            md.signed.version = 0  # the first publish makes each version 1
        repo._publish_root(previous=None)
        repo._publish(targets_changed=True)
        return repo

    # ---- what the commands do ----------------------------------------------------------------------------
    def add_bundle(self, bundle: str | Path, trusted_keys: list[Ed25519PublicKey], *,
                   channel: str = DEFAULT_CHANNEL) -> dict[str, Any]:
        """Verify ``bundle`` (signature, files, self-test), publish it as the newest target of its model on
        ``channel``; returns the target's path and custom metadata."""
        check_name(channel, "channel")
        with tempfile.TemporaryDirectory(prefix="compactai-repo-add-") as work:
            verified = verify_bundle(bundle, VerifyPolicy(trusted_keys), validate=True, workdir=Path(work) / "b")
            archive = Path(work) / "bundle.tar"
            write_archive(verified.root, archive)
            return self._add_verified(verified.manifest, verified.key_id, archive, channel)

    @_exclusive
    def _add_verified(self, manifest: dict[str, Any], key_id: str, archive: Path, channel: str) -> dict[str, Any]:
        path = target_path(manifest["name"], channel)
        current = self.targets.signed.targets.get(path)
        current_version = (current.custom or {}).get(CUSTOM_KEY, {}).get("version") if current else None
        if isinstance(current_version, int) and manifest["version"] <= current_version:
            raise BadInputError(f"{path} is at version {current_version}; a new bundle for it must have a higher "
                                f"version (got {manifest['version']}). Rebuild it with --version "
                                f"{current_version + 1}.")
        target = TargetFile.from_file(path, str(archive))
        digest = target.hashes["sha256"]
        stored = self.path / TARGETS_DIR / manifest["name"] / f"{digest}.{channel}.tar"
        stored.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(archive, stored)
        os.chmod(stored, 0o644)
        info = {"name": manifest["name"], "version": manifest["version"], "semver": manifest["semver"],
                "channel": channel, "bundle_key_id": key_id}
        target.unrecognized_fields["custom"] = {CUSTOM_KEY: info}
        previous = self.targets.signed.targets.get(path)
        self.targets.signed.targets[path] = target
        try:
            self._publish(targets_changed=True)
        except BadInputError:  # not signed (keys missing): nothing was written, so drop the file too
            if previous is None:
                del self.targets.signed.targets[path]
            else:
                self.targets.signed.targets[path] = previous
            if previous is None or previous.hashes.get("sha256") != digest:
                stored.unlink(missing_ok=True)
            raise
        return {"target": path, "file": str(stored), "length": target.length, "sha256": digest, **info}

    @_exclusive
    def refresh_timestamp(self) -> Metadata[Timestamp]:
        """A new timestamp version with a fresh expiry (run it from cron well within the expiry period);
        the snapshot (also online) is re-signed too once half of its period has passed."""
        period = parse_duration(self.settings["expires"]["snapshot"])
        if (self.snapshot.signed.expires - _utc(self.now)).total_seconds() < period / 2:
            self._publish(targets_changed=False)
            return self.timestamp
        self._bump(self.timestamp, "timestamp")
        self._write("timestamp", self.timestamp, versioned=False)
        return self.timestamp

    @_exclusive
    def resign(self, role: str) -> dict[str, Any]:
        """Sign ``role`` again with a fresh expiry and its keys unchanged (offline roles: root, targets)."""
        if role not in ROLES:
            raise ParameterError(f"The role must be one of {', '.join(ROLES)}. Got {role!r} instead.")
        if role == "root":
            self._publish_root(copy.deepcopy(self.root))
        elif role == "timestamp":
            self.refresh_timestamp()
        else:
            self._publish(targets_changed=role == "targets")
        return self.status()

    @_exclusive
    def rotate(self, role: str, *, add: list[FleetKey] | None = None, remove: list[str] | None = None,
               threshold: int | None = None) -> dict[str, Any]:
        """Change the keys or threshold of ``role`` with a new root version, signed by the old root's
        threshold and the new one's; the role's own metadata is re-signed with its new keys."""
        if role not in ROLES:
            raise ParameterError(f"The role must be one of {', '.join(ROLES)}. Got {role!r} instead.")
        if not (add or remove or threshold):
            raise BadInputError("Nothing to rotate: give --add-key, --remove-key and/or --threshold.")
        previous = copy.deepcopy(self.root)
        spec = self.root.signed
        for key in add or []:
            spec.add_key(key.key, role)
            self._given.append(key)
        for keyid in remove or []:
            if keyid not in spec.roles[role].keyids:
                raise BadInputError(f"Key {keyid[:12]} is not a {role} key (its keys: "
                                    f"{', '.join(k[:12] for k in spec.roles[role].keyids)}).")
            spec.revoke_key(keyid, role)
        if threshold is not None:
            spec.roles[role].threshold = threshold
        _check_threshold(role, spec.roles[role].threshold, len(spec.roles[role].keyids))
        self._publish_root(previous)
        self._publish(targets_changed=role == "targets")
        self._record_online_keys([str(k.path) for k in add or [] if k.signer is not None and k.path])
        return self.status()

    @_exclusive
    def revoke(self, keyid: str) -> dict[str, Any]:
        """Remove a key from every role that trusts it (a new root version); re-sign those roles."""
        roles = [role for role in ROLES if keyid in self.root.signed.roles[role].keyids]
        if not roles:
            raise BadInputError(f"Key {keyid[:12]} is not used by any role of {self.path}; nothing to revoke.")
        previous = copy.deepcopy(self.root)
        for role in roles:
            spec = self.root.signed.roles[role]
            if len(spec.keyids) - 1 < spec.threshold:
                raise BadInputError(
                    f"Revoking {keyid[:12]} would leave the {role} role {len(spec.keyids) - 1} key(s) for a threshold "
                    f"of {spec.threshold}; add a replacement and remove it in one step: compactai repo rotate "
                    f"{self.path} --role {role} --add-key NEW --remove-key {keyid[:12]}...")
            self.root.signed.revoke_key(keyid, role)
        self._given = [k for k in self._given if k.keyid != keyid]  # never sign with it again
        self._publish_root(previous)
        self._publish(targets_changed="targets" in roles)
        self._record_online_keys([])
        return {"revoked": keyid, "revoked_from": roles, **self.status()}

    def _record_online_keys(self, added: list[str]) -> None:
        """Keep publisher.json's online key paths to the keys the root now names (so cron keeps signing)."""
        recorded = self.settings.get("online_keys", {})
        online: dict[str, list[str]] = {}
        for role in ONLINE_ROLES:
            keyids = set(self.root.signed.roles[role].keyids)
            paths = dict.fromkeys([*recorded.get(role, []), *added])
            online[role] = [p for p in paths if Path(p).is_file() and load_keys([p])[0].keyid in keyids]
        if online != recorded:
            self.settings["online_keys"] = online
            _atomic_write(self.path / PUBLISHER_FILE, (json.dumps(self.settings, indent=2) + "\n").encode())
            self._online = None

    def status(self) -> dict[str, Any]:
        """Each role's version, expiry, threshold and key ids, and the published targets."""
        spec = self.root.signed
        documents: dict[str, Metadata[Any]] = {"root": self.root, "targets": self.targets,
                                               "snapshot": self.snapshot, "timestamp": self.timestamp}
        now = _utc(self.now)
        roles = {role: {"version": md.signed.version, "expires": md.signed.expires.isoformat(),
                        "expires_in_days": round((md.signed.expires - now).total_seconds() / 86400, 2),
                        "threshold": spec.roles[role].threshold, "keys": list(spec.roles[role].keyids)}
                 for role, md in documents.items()}
        targets = {path: {"length": t.length, **(t.custom or {}).get(CUSTOM_KEY, {})}
                   for path, t in self.targets.signed.targets.items()}
        return {"repository": str(self.path), "roles": roles, "targets": targets}

    # ---- signing and writing -----------------------------------------------------------------------------
    def _signers(self) -> list[FleetKey]:
        if self._online is None:
            paths = [p for role in ONLINE_ROLES for p in self.settings.get("online_keys", {}).get(role, [])]
            self._online = load_keys([p for p in paths if Path(p).exists()])
        return [k for k in [*self._given, *self._online] if k.signer is not None]

    def _sign(self, md: Metadata[Any], role: str, delegators: list[Root]) -> None:
        """Sign with every available key of ``role`` and check each delegator's threshold is met."""
        md.signatures.clear()
        wanted = {kid for root in delegators for kid in root.roles[role].keyids}
        for key in self._signers():
            if key.keyid in wanted and key.keyid not in md.signatures:
                md.sign(key.signer, append=True)  # type: ignore[arg-type]  # _signers() keeps only keys with one
        for root in delegators:
            try:
                root.verify_delegate(role, md.signed_bytes, md.signatures)
            except UnsignedMetadataError as exc:
                spec = root.roles[role]
                raise BadInputError(
                    f"The {role} metadata (v{md.signed.version}) needs {spec.threshold} signature(s) from root "
                    f"v{root.version}'s {role} keys ({', '.join(k[:12] for k in spec.keyids)}) and has "
                    f"{len(md.signatures)} ({exc}). Pass the missing private key(s) with --signing-key (repo init: "
                    "give private key files, not .pub).") from exc

    def _bump(self, md: Metadata[Any], role: str) -> None:
        md.signed.version += 1
        md.signed.expires = _utc(self.now) + timedelta(seconds=parse_duration(self.settings["expires"][role]))
        self._sign(md, role, [self.root.signed])

    def _publish_root(self, previous: Metadata[Root] | None) -> None:
        if previous is not None:
            self.root.signed.version = previous.signed.version + 1
        self.root.signed.expires = _utc(self.now) + timedelta(seconds=parse_duration(self.settings["expires"]["root"]))
        delegators = [self.root.signed] if previous is None else [self.root.signed, previous.signed]
        self._sign(self.root, "root", delegators)
        self._write(f"{self.root.signed.version}.root", self.root, versioned=False)
        self._write("root", self.root, versioned=False)

    def _publish(self, *, targets_changed: bool) -> None:
        """Re-sign targets (if changed), then snapshot and timestamp; write timestamp.json last."""
        if targets_changed:
            self._bump(self.targets, "targets")
            self._write("targets", self.targets)
        self.snapshot.signed.meta["targets.json"] = MetaFile.from_data(
            self.targets.signed.version, self.targets.to_bytes(_SERIALIZER), ["sha256"])
        self._bump(self.snapshot, "snapshot")
        self._write("snapshot", self.snapshot)
        self.timestamp.signed.snapshot_meta = MetaFile.from_data(
            self.snapshot.signed.version, self.snapshot.to_bytes(_SERIALIZER), ["sha256"])
        self._bump(self.timestamp, "timestamp")
        self._write("timestamp", self.timestamp, versioned=False)

    def _write(self, name: str, md: Metadata[Any], *, versioned: bool = True) -> None:
        data = md.to_bytes(_SERIALIZER)
        if versioned:  # consistent snapshots: devices fetch N.snapshot.json / N.targets.json
            _atomic_write(self.metadata_dir / f"{md.signed.version}.{name}.json", data)
        _atomic_write(self.metadata_dir / f"{name}.json", data)


def _utc(now: datetime | None) -> datetime:
    return (now or datetime.now(timezone.utc)).replace(microsecond=0)


def _check_threshold(role: str, threshold: int, keys: int) -> None:
    if keys < 1:
        raise ParameterError(f"The {role} role needs at least one key (--{role}-key).")
    if not 1 <= threshold <= keys:
        raise ParameterError(f"The threshold of the {role} role must be between 1 and its {keys} key(s). "
                             f"Got {threshold} instead.")
