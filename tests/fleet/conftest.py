"""Fixtures for fleet updates: keys, a real TUF repository directory served over HTTP on 127.0.0.1
by a server that can misbehave (swap files, send endless data, trickle, serve another directory),
a device (update agent + install directory) and a forger who holds some stolen keys."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, MetaFile, TargetFile

from compactai.bundle import build_bundle, generate_keypair, load_private_key, load_public_key
from compactai.bundle.build import write_archive
from compactai.fleet import FleetKey, Repository, load_key
from compactai.fleet.layout import CUSTOM_KEY, target_path
from compactai.runtime import ProbationPolicy, UpdateAgent, UpdateLimits, UpdateResult, update_from_repository
from tests.runtime.conftest import tiny_model

MODEL = "tiny"


class RepoServer:
    """Serves a directory over HTTP/1.0 on 127.0.0.1 and logs every path asked for. Misbehaviours, by
    URL path: ``overrides`` (other bytes: a swapped file), ``endless`` (no Content-Length, data until
    the client hangs up), ``trickle`` (one byte every N seconds); ``root`` may point at another
    directory (an old copy: rollback/freeze, or an attacker's repository: a malicious mirror)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.overrides: dict[str, bytes] = {}
        self.endless: set[str] = set()
        self.trickle: dict[str, float] = {}
        self.requests: list[str] = []
        self.stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                server.requests.append(path)
                if path in server.endless:
                    self.send_response(200)
                    self.end_headers()
                    self._send_endless()
                    return
                body = server.overrides.get(path)
                file = server.root / path.lstrip("/")
                if body is None and ".." not in path and file.is_file():
                    body = file.read_bytes()
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if path in server.trickle:
                    self._send_trickle(body, server.trickle[path])
                else:
                    self.wfile.write(body)

            def _send_endless(self) -> None:
                block, sent = b"\0" * 65536, 0
                try:
                    while sent < 256 * 1024 * 1024 and not server.stop.is_set():  # bounded so a test ends
                        self.wfile.write(block)
                        sent += len(block)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _send_trickle(self, body: bytes, interval: float) -> None:
                try:
                    for i in range(len(body)):
                        if server.stop.wait(interval) or i * interval > 60:  # bounded so a test ends
                            return
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"


class Fleet:
    """A publisher (keys, repository), a server for it, and one device that runs version 1."""

    def __init__(self, tmp: Path, server: RepoServer, *, targets_keys: int = 1, targets_threshold: int = 1,
                 repo_dir: Path | None = None) -> None:
        self.tmp = tmp
        self.server = server
        self.repo_dir = repo_dir or server.root
        self.bundle_key = generate_keypair(tmp / "keys" / "bundle")
        self.root_keys = [self.key("root1")]
        self.targets_keys = [self.key(f"targets{i + 1}") for i in range(targets_keys)]
        self.snapshot_key, self.timestamp_key = self.key("snapshot"), self.key("timestamp")
        Repository.init(self.repo_dir, root=self.root_keys, targets=self.targets_keys, snapshot=[self.snapshot_key],
                        timestamp=[self.timestamp_key], thresholds={"targets": targets_threshold})
        # the device is provisioned with the root.json of that day
        self.trusted_root = tmp / "device-root.json"
        shutil.copyfile(self.repo_dir / "metadata" / "root.json", self.trusted_root)
        self.install = tmp / "install"
        self.limits = UpdateLimits(download_deadline_s=60.0, min_download_rate=0.0, rate_window_s=5.0)
        self.versions = iter(range(1000))

    def key(self, name: str) -> FleetKey:
        return load_key(generate_keypair(self.tmp / "keys" / name)[0])

    def repo(self, signers: list[FleetKey] | None = None, now: datetime | None = None) -> Repository:
        """The repository as the publisher opens it: the online keys are on file, offline ones are given."""
        return Repository(self.repo_dir, signers if signers is not None else [*self.root_keys, *self.targets_keys],
                          now=now)

    def bundle(self, version: int, private_key: Any = None, name: str = MODEL) -> Path:
        n = next(self.versions)
        model = tiny_model(self.tmp / f"model-{n}.onnx", scale=float(version + 1))
        out = self.tmp / f"bundle-{n}-v{version}"
        build_bundle(model, out, private_key or load_private_key(self.bundle_key[0]), version, name=name)
        return out

    def publish(self, version: int, signers: list[FleetKey] | None = None) -> dict[str, Any]:
        return self.repo(signers).add_bundle(self.bundle(version), [load_public_key(self.bundle_key[1])])

    def agent(self) -> UpdateAgent:
        return UpdateAgent(self.install, [load_public_key(self.bundle_key[1])], probation=ProbationPolicy(queries=4),
                           limits=self.limits)

    def update(self, agent: UpdateAgent | None = None) -> UpdateResult:
        return update_from_repository(agent or self.agent(), self.server.url, self.trusted_root, model=MODEL)

    def active(self) -> int | None:
        return self.agent().state.active

    def snapshot_dir(self, name: str) -> Path:
        """A copy of the repository as it is now (what a mirror that stopped syncing serves)."""
        copy = self.tmp / name
        shutil.copytree(self.repo_dir, copy)
        return copy

    def forge_release(self, mirror: Path, version: int, *, targets: list[FleetKey], snapshot: list[FleetKey],
                      timestamp: list[FleetKey], extra_targets: dict[str, Path] | None = None,
                      requires: list[str] | None = None) -> str:
        """As an attacker with the given keys: publish an evil bundle (signed with the attacker's own bundle
        key) as the newest target in ``mirror``, bump and sign targets, snapshot and timestamp with
        exactly those keys (no threshold check). Returns the evil target file's URL path."""
        evil_key = generate_keypair(self.tmp / "keys" / f"attacker-{version}")[0]
        archive = self.tmp / f"evil-{version}.tar"
        write_archive(self.bundle(version, load_private_key(evil_key)), archive)
        meta = mirror / "metadata"
        md = {role: Metadata.from_file(str(meta / f"{role}.json")) for role in ("targets", "snapshot", "timestamp")}
        files = {target_path(MODEL, "stable"): archive, **(extra_targets or {})}
        url_path = ""
        for path, local in files.items():
            target = TargetFile.from_file(path, str(local))
            folder, _, base = path.rpartition("/")
            stored = mirror / "targets" / folder / f"{target.hashes['sha256']}.{base}"
            stored.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, stored)
            if path == target_path(MODEL, "stable"):
                info = {"name": MODEL, "version": version, "semver": f"0.{version}.0", "channel": "stable"}
                target.unrecognized_fields["custom"] = {CUSTOM_KEY: {**info, "requires": requires or []}}
                url_path = "/" + stored.relative_to(mirror).as_posix()
            md["targets"].signed.targets[path] = target
        expires = datetime.now(timezone.utc) + timedelta(days=1)
        md["targets"].signed.version += 1
        md["snapshot"].signed.meta["targets.json"] = MetaFile(version=md["targets"].signed.version)
        md["snapshot"].signed.version += 1
        md["timestamp"].signed.snapshot_meta = MetaFile(version=md["snapshot"].signed.version)
        md["timestamp"].signed.version += 1
        for role, signers in (("targets", targets), ("snapshot", snapshot), ("timestamp", timestamp)):
            md[role].signed.expires = expires
            md[role].signatures.clear()
            for signer in signers:
                md[role].sign(signer.signer, append=True)
        for role in ("targets", "snapshot"):
            data = md[role].to_bytes()
            (meta / f"{md[role].signed.version}.{role}.json").write_bytes(data)
        (meta / "timestamp.json").write_bytes(md["timestamp"].to_bytes())
        return url_path


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RepoServer]:
    served = RepoServer(tmp_path / "repo")
    thread = threading.Thread(target=served.httpd.serve_forever, daemon=True)
    thread.start()
    yield served
    served.stop.set()
    served.httpd.shutdown()
    served.httpd.server_close()


@pytest.fixture
def fleet(tmp_path: Path, server: RepoServer) -> Fleet:
    """A repository (1-of-1 keys per role) with version 1 published, and a device running version 1."""
    made = Fleet(tmp_path, server)
    made.publish(1)
    result = made.update()
    assert result.status == "committed", result
    return made
