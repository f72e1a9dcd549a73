"""`compactai repo init|add|refresh-timestamp|resign|rotate|revoke|status`: a fleet repository on TUF (docs/fleet.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from compactai.cli._common import JSON_OPTION, Output, app, table

repo_app = typer.Typer(help="Publish bundles to a fleet repository (The Update Framework, python-tuf): separate "
                            "roles, threshold signatures, key rotation and revocation. See docs/fleet.md.",
                       no_args_is_help=True)
app.add_typer(repo_app, name="repo")

SIGNING_HELP = "Private key (file or keygen directory) to sign with, for offline roles (repeatable)."


def _print_status(out: Output, status: dict[str, Any], title: str) -> None:
    rows = [[role, info["version"], f"{info['threshold']} of {len(info['keys'])}",
             ", ".join(k[:12] for k in info["keys"]), f"{info['expires']} (in {info['expires_in_days']:g} d)"]
            for role, info in status["roles"].items()]
    out.console.print(table(title, ["role", "version", "threshold", "keys", "expires"], rows))
    if status["targets"]:
        out.console.print(table("Targets", ["target", "version", "semver", "bytes"],
                                [[path, t.get("version"), t.get("semver"), t.get("length")]
                                 for path, t in sorted(status["targets"].items())]))


def _open(repo: Path, signing_keys: list[str]) -> Any:
    from compactai.fleet import Repository, load_keys

    return Repository(repo, load_keys(signing_keys))


@repo_app.command("init")
def init(
    repo: Path = typer.Argument(..., help="Repository directory to create (metadata/, targets/, publisher.json)."),
    root_key: list[str] = typer.Option([], "--root-key", help="Root key (repeatable; keep them offline)."),
    root_threshold: int = typer.Option(1, "--root-threshold", help="Root signatures required."),
    targets_key: list[str] = typer.Option([], "--targets-key", help="Targets key (repeatable; offline)."),
    targets_threshold: int = typer.Option(1, "--targets-threshold", help="Targets signatures required."),
    snapshot_key: list[str] = typer.Option([], "--snapshot-key", help="Snapshot key (online; its path is recorded)."),
    timestamp_key: list[str] = typer.Option([], "--timestamp-key", help="Timestamp key (online; its path is "
                                            "recorded for refresh-timestamp)."),
    root_expires: str = typer.Option("365d", "--root-expires", help="How long each root version is valid."),
    targets_expires: str = typer.Option("90d", "--targets-expires", help="How long each targets version is valid."),
    snapshot_expires: str = typer.Option("7d", "--snapshot-expires", help="How long each snapshot is valid."),
    timestamp_expires: str = typer.Option("1d", "--timestamp-expires", help="How long each timestamp is valid: "
                                          "a device refuses (and reports) metadata older than this (freeze)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Create the TUF metadata (root, targets, snapshot, timestamp) of an empty repository."""
    from compactai.fleet import Repository, load_keys

    out = Output(json_output)
    expires = {"root": root_expires, "targets": targets_expires, "snapshot": snapshot_expires,
               "timestamp": timestamp_expires}
    created = Repository.init(repo, root=load_keys(root_key), targets=load_keys(targets_key),
                              snapshot=load_keys(snapshot_key), timestamp=load_keys(timestamp_key),
                              thresholds={"root": root_threshold, "targets": targets_threshold}, expires=expires)
    status = created.status()
    _print_status(out, status, f"Fleet repository {repo}")
    out.console.print(f"Serve {repo}/metadata and {repo}/targets over HTTP(S); give devices "
                      f"{repo}/metadata/root.json as their trusted root.", highlight=False)
    out.emit({**status, "trusted_root": repo / "metadata" / "root.json"})


@repo_app.command("add")
def add(
    repo: Path = typer.Argument(..., help="Repository directory."),
    bundle: Path = typer.Argument(..., help="Signed bundle (directory or .tar) from compactai bundle."),
    trusted_key: list[str] = typer.Option([], "--trusted-key", "-t", help="Public key the bundle must be signed "
                                          "with (repeatable), as for compactai verify."),
    channel: str = typer.Option("stable", "--channel", "-c", help="Channel the bundle is published on."),
    signing_key: list[str] = typer.Option([], "--signing-key", "-s", help=SIGNING_HELP),
    json_output: bool = JSON_OPTION,
) -> None:
    """Verify a bundle and publish it as the newest target of its model on a channel; re-sign targets,
    snapshot and timestamp."""
    from compactai.bundle import load_public_key
    from compactai.errors import BadInputError

    if not trusted_key:
        raise BadInputError("Give at least one --trusted-key PUB: the key the bundle was signed with.")
    out = Output(json_output)
    opened = _open(repo, signing_key)
    with out.progress("Publishing") as say:
        say(f"verifying {bundle} (signature, files, self-test)")
        added = opened.add_bundle(bundle, [load_public_key(k) for k in trusted_key], channel=channel)
    out.console.print(f"[green]published:[/green] {added['target']} = {added['name']} v{added['version']} "
                      f"({added['semver']}), {added['length']:,} bytes", highlight=False)
    out.emit({"added": added, **opened.status()})


@repo_app.command("refresh-timestamp")
def refresh_timestamp(
    repo: Path = typer.Argument(..., help="Repository directory."),
    signing_key: list[str] = typer.Option([], "--signing-key", "-s", help="Timestamp key, if its recorded path "
                                          "is not available (repeatable)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Sign a new timestamp with a fresh expiry; run it from cron well within --timestamp-expires."""
    out = Output(json_output)
    opened = _open(repo, signing_key)
    timestamp = opened.refresh_timestamp().signed
    out.console.print(f"timestamp v{timestamp.version}, expires {timestamp.expires.isoformat()}", highlight=False)
    out.emit({"repository": repo, "timestamp_version": timestamp.version,
              "timestamp_expires": timestamp.expires.isoformat()})


@repo_app.command("resign")
def resign(
    repo: Path = typer.Argument(..., help="Repository directory."),
    role: str = typer.Option(..., "--role", help="root, targets, snapshot or timestamp."),
    signing_key: list[str] = typer.Option([], "--signing-key", "-s", help=SIGNING_HELP),
    json_output: bool = JSON_OPTION,
) -> None:
    """Sign a role again with a fresh expiry and unchanged keys (before root or targets expire)."""
    out = Output(json_output)
    status = _open(repo, signing_key).resign(role)
    _print_status(out, status, f"Re-signed the {role} role of {repo}")
    out.emit(status)


@repo_app.command("rotate")
def rotate(
    repo: Path = typer.Argument(..., help="Repository directory."),
    role: str = typer.Option(..., "--role", help="root, targets, snapshot or timestamp."),
    add_key: list[str] = typer.Option([], "--add-key", help="Key to add to the role (a private key also signs)."),
    remove_key: list[str] = typer.Option([], "--remove-key", help="Key file or TUF key id to remove."),
    threshold: int | None = typer.Option(None, "--threshold", help="New signature threshold of the role."),
    signing_key: list[str] = typer.Option([], "--signing-key", "-s", help="Root keys (old and new threshold) and "
                                          "the role's keys to sign with (repeatable)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Change a role's keys or threshold: a new root version signed by the old and the new root threshold."""
    from compactai.fleet import load_keys, resolve_keyid

    out = Output(json_output)
    opened = _open(repo, signing_key)
    status = opened.rotate(role, add=load_keys(add_key), remove=[resolve_keyid(k) for k in remove_key],
                           threshold=threshold)
    _print_status(out, status, f"Rotated the {role} role of {repo}")
    out.emit(status)


@repo_app.command("revoke")
def revoke(
    repo: Path = typer.Argument(..., help="Repository directory."),
    key: str = typer.Option(..., "--key", help="The compromised key: a key file or its TUF key id."),
    signing_key: list[str] = typer.Option([], "--signing-key", "-s", help="Root keys and the affected roles' "
                                          "remaining keys to sign with (repeatable)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Remove a compromised key from every role (a new root version); devices refuse what it signs."""
    from compactai.fleet import resolve_keyid

    out = Output(json_output)
    opened = _open(repo, signing_key)
    status = opened.revoke(resolve_keyid(key))
    _print_status(out, status, f"Revoked {status['revoked'][:12]} from {', '.join(status['revoked_from'])}")
    out.emit(status)


@repo_app.command("status")
def status(
    repo: Path = typer.Argument(..., help="Repository directory."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Each role's version, threshold, keys and expiry, and the published targets."""
    out = Output(json_output)
    current = _open(repo, []).status()
    _print_status(out, current, f"Fleet repository {repo}")
    out.emit(current)
