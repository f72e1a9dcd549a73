"""The install directory's durable state: one pointer file replaced atomically.

Layout of an install directory::

    state.json        the pointer: active version, previous version, trial flag,
                      highest version ever trusted, block-list (the only source of truth)
    versions/<N>/     verified bundles, side by side
    staging/          downloads in progress (same filesystem, so a rename moves them)
    events.jsonl      one JSON line per event (refusals with their reason, activations, rollbacks)

state.json is only ever replaced by ``os.replace`` of a fully written and fsync'ed temp file,
followed by an fsync of the directory, so after a crash it holds either the old or the new
state, never a mix.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
VERSIONS_DIR = "versions"
STAGING_DIR = "staging"
EVENTS_FILE = "events.jsonl"
CRASH_ENV = "COMPACTAI_UPDATE_CRASH_AT"  # test hook: os._exit at the named activation step


@dataclass
class InstallState:
    """Which version runs, which one to fall back to, and what this device will never accept again."""

    active: int | None = None
    previous: int | None = None
    trial: bool = False  # the active version is on probation, not yet committed
    highest_trusted: int = 0
    blocked: dict[int, str] = field(default_factory=dict)
    updated: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["blocked"] = {str(k): v for k, v in self.blocked.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstallState:
        return cls(
            active=data.get("active"),
            previous=data.get("previous"),
            trial=bool(data.get("trial", False)),
            highest_trusted=int(data.get("highest_trusted", 0)),
            blocked={int(k): str(v) for k, v in (data.get("blocked") or {}).items()},
            updated=str(data.get("updated", "")),
        )


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories make renames inside them durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory bottom-up."""
    directories = []
    for top, _dirs, files in os.walk(root):
        directories.append(Path(top))
        for name in files:
            fsync_path(Path(top) / name)
    for directory in reversed(directories):  # children first, so each parent records final entries
        fsync_path(directory)


def crash_point(step: str) -> None:
    """Die at once (no cleanup, like a power cut) if the test hook names this step."""
    if os.environ.get(CRASH_ENV) == step:
        os._exit(86)


def load_state(install_dir: Path) -> InstallState:
    path = install_dir / STATE_FILE
    if not path.exists():
        return InstallState()
    return InstallState.from_dict(json.loads(path.read_text()))


def save_state(install_dir: Path, state: InstallState, crash_prefix: str = "") -> None:
    """Replace state.json atomically and durably (temp file, fsync, os.replace, fsync dir)."""
    state.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    path = install_dir / STATE_FILE
    tmp = path.with_name(STATE_FILE + ".tmp")
    with tmp.open("w") as stream:
        stream.write(json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n")
        stream.flush()
        os.fsync(stream.fileno())
    if crash_prefix:
        crash_point(f"{crash_prefix}-state-written")
    os.replace(tmp, path)
    fsync_path(install_dir)
    if crash_prefix:
        crash_point(f"{crash_prefix}-switched")
