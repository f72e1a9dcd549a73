"""`compactai repo ...` and `compactai update --repo-url` end to end, in real processes, over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from compactai.bundle import build_bundle, generate_keypair, load_private_key
from compactai.fleet import Repository
from tests.fleet.conftest import tiny_model

CLI = [sys.executable, "-c", "from compactai.cli import main; main()"]


def run(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, check=False)


def run_json(*args: str | Path, code: int = 0) -> dict:
    done = run(*args, "--json")
    assert done.returncode == code, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
def test_repo_commands_and_update_from_the_repository(tmp_path: Path, server):
    repo, keys, install = server.root, tmp_path / "keys", tmp_path / "install"
    made = run_json("keygen", "-o", keys / "root")  # compactai keygen keys are TUF keys
    assert Path(made["private_key"]).is_file()
    for name in ("targets", "targets2", "snapshot", "timestamp", "publisher"):
        generate_keypair(keys / name)
    publisher = load_private_key(keys / "publisher" / "bundle-signing.key")
    bundles = [tmp_path / f"b{v}" for v in (1, 2)]
    for version, out in enumerate(bundles, start=1):
        build_bundle(tiny_model(tmp_path / f"m{version}.onnx", float(version)), out, publisher, version, name="tiny")

    init = run_json("repo", "init", repo, "--root-key", keys / "root", "--targets-key", keys / "targets",
                    "--snapshot-key", keys / "snapshot", "--timestamp-key", keys / "timestamp",
                    "--timestamp-expires", "6h")
    assert {role: info["version"] for role, info in init["roles"].items()} == \
        {"root": 1, "targets": 1, "snapshot": 1, "timestamp": 1}
    trusted_root = tmp_path / "device-root.json"
    trusted_root.write_bytes(Path(init["trusted_root"]).read_bytes())
    pub = keys / "publisher" / "bundle-signing.pub"
    added = run_json("repo", "add", repo, bundles[0], "--trusted-key", pub, "--signing-key", keys / "targets")
    assert added["added"]["target"] == "tiny/stable.tar" and added["added"]["version"] == 1

    device = ("update", "--repo-url", server.url, "--trusted-root", trusted_root, "--install-dir", install,
              "--trusted-key", pub, "--probation-queries", "4")
    first = run_json(*device, "--model", "tiny")
    assert first["result"]["status"] == "committed" and first["status"]["active"] == 1
    assert first["fleet"]["expired"] is False and first["fleet"]["last_refresh"] is not None
    assert 0 < first["fleet"]["seconds_to_expiry"] <= 6 * 3600

    refreshed = run_json("repo", "refresh-timestamp", repo)  # the online key's path was recorded by init
    assert refreshed["timestamp_version"] == 3
    again = run_json(*device)  # the model name now comes from the active version
    assert again["result"]["status"] == "current" and again["fleet"]["timestamp_version"] == 3

    rotated = run_json("repo", "rotate", repo, "--role", "targets", "--add-key", keys / "targets2",
                       "--remove-key", keys / "targets", "--signing-key", keys / "root")
    assert rotated["roles"]["root"]["version"] == 2 and len(rotated["roles"]["targets"]["keys"]) == 1
    run_json("repo", "add", repo, bundles[1], "--trusted-key", pub, "--signing-key", keys / "targets2")
    second = run_json(*device)
    assert second["result"]["status"] == "committed" and second["status"]["active"] == 2
    assert second["fleet"]["root_version"] == 2

    # the last targets key cannot be revoked alone: the message says how to replace it
    refused = run("repo", "revoke", repo, "--key", keys / "targets2", "--signing-key", keys / "root")
    assert refused.returncode == 2 and "repo rotate" in refused.stderr

    # a frozen mirror: an expired timestamp is refused (exit 1) and the JSON reports the staleness
    stale = Repository(repo, now=datetime.now(timezone.utc) - timedelta(days=1)).refresh_timestamp()
    server.overrides["/metadata/timestamp.json"] = stale.to_bytes()
    frozen = run_json(*device, code=1)
    assert frozen["reason"] == "tuf-expired" and frozen["status"]["active"] == 2
    assert frozen["fleet"]["last_reason"] == "tuf-expired"
    assert frozen["fleet"]["last_refresh"] == second["fleet"]["last_refresh"]
    assert frozen["fleet"]["seconds_since_refresh"] >= 0


def test_update_options_are_checked_up_front(tmp_path: Path):
    pub = generate_keypair(tmp_path / "keys")[1]
    base = ("update", "--install-dir", tmp_path / "install", "--trusted-key", pub)
    alone = run(*base, "--repo-url", "http://127.0.0.1:9/")
    assert alone.returncode == 2 and "--trusted-root" in alone.stderr
    both = run(*base, "--repo-url", "http://127.0.0.1:9/", "--trusted-root", tmp_path / "r.json", "--source", "x")
    assert both.returncode == 2 and "not both" in both.stderr
    nothing = run(*base, "--repo-url", "http://127.0.0.1:9/", "--trusted-root", tmp_path / "r.json")
    assert nothing.returncode == 2 and "--model" in nothing.stderr
