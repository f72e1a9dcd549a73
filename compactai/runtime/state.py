"""The install directory's durable state: one pointer file replaced atomically.

Layout of an install directory::

    state.json        the pointer: active version, previous version, trial flag,
                      highest version ever trusted, block-list (the only source of truth)
    state.json.bak    a copy of the last pointer written, used when state.json is lost or corrupt
    versions/<N>/     verified bundles, side by side
    staging/          downloads in progress (same filesystem, so a rename moves them)
    events.jsonl      one JSON line per event (refusals with their reason, activations, rollbacks)

state.json is only ever replaced by ``os.replace`` of a fully written and fsync'ed temp file,
followed by an fsync of the directory, so after a crash it holds either the old or the new
state, never a mix. The backup is written the same way right after it. Readers never take a
lock: they read whichever complete file ``os.replace`` left in place.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
BACKUP_FILE = "state.json.bak"
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
    probation_attempts: int = 0  # probations started for the current trial (a kill interrupts one)
    updated: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["blocked"] = {str(k): v for k, v in self.blocked.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InstallState:
        """The state from its JSON form; ValueError if any field has the wrong type (a corrupt file)."""
        if not isinstance(data, dict):
            raise ValueError("the state is not a JSON object")
        active, previous = data.get("active"), data.get("previous")
        blocked = data.get("blocked") or {}
        numbers = [active, previous, data.get("highest_trusted", 0), data.get("probation_attempts", 0)]
        if (not all(n is None or (isinstance(n, int) and not isinstance(n, bool)) for n in numbers)
                or not isinstance(blocked, dict) or not isinstance(data.get("trial", False), bool)):
            raise ValueError("the state has a field of the wrong type")
        return cls(
            active=active,
            previous=previous,
            trial=data.get("trial", False),
            highest_trusted=int(data.get("highest_trusted", 0)),
            blocked={int(k): str(v) for k, v in blocked.items()},
            probation_attempts=int(data.get("probation_attempts", 0)),
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


def read_state_file(path: Path) -> InstallState | None:
    """The state held in ``path``, or None if it is missing, unreadable, empty or corrupt."""
    try:
        return InstallState.from_dict(json.loads(path.read_bytes()))
    except (OSError, ValueError, TypeError, AttributeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None


def read_pointer(install_dir: Path) -> tuple[InstallState | None, str]:
    """(state, where it came from): ``"state"`` (state.json), ``"backup"`` (state.json.bak), or
    ``"lost"`` (None: neither holds a valid state). Never writes and never locks."""
    for name, source in ((STATE_FILE, "state"), (BACKUP_FILE, "backup")):
        state = read_state_file(install_dir / name)
        if state is not None:
            return state, source
    return None, "lost"


def recover_pointer(install_dir: Path, verified: Callable[[int], bool]) -> tuple[InstallState, str]:
    """The pointer and where it came from, never written and never guessed.

    state.json if it is valid (``"state"``); else the backup if the versions it names pass
    ``verified`` (``"backup"``); else a pointer rebuilt from the installed versions that pass it
    (``"rebuilt"``): the highest is active and is the rollback floor (never lower than a readable
    backup's floor, whose block-list is kept too); ``"new"`` if no version verifies.
    """
    state, source = read_pointer(install_dir)
    if state is not None and source == "state":
        return state, source
    if state is not None and all(verified(v) for v in (state.active, state.previous) if v is not None):
        return state, source
    root = install_dir / VERSIONS_DIR
    names = [p.name for p in root.iterdir() if p.name.isdigit()] if root.is_dir() else []
    versions = sorted(int(n) for n in names if verified(int(n)))
    floor, blocked = (state.highest_trusted, state.blocked) if state is not None else (0, {})
    if not versions:
        return InstallState(highest_trusted=floor, blocked=blocked), "new"
    return InstallState(active=versions[-1], previous=versions[-2] if len(versions) > 1 else None,
                        highest_trusted=max(versions[-1], floor), blocked=blocked), "rebuilt"


def load_state(install_dir: Path) -> InstallState:
    """The pointer as stored (state.json, else its backup); an empty state if both are missing or corrupt.

    :class:`~compactai.runtime.UpdateAgent` also rebuilds a lost pointer from the installed,
    verified versions; this function only reads.
    """
    return read_pointer(install_dir)[0] or InstallState()


def _replace(path: Path, text: str) -> Path:
    """Write ``text`` to a temp file next to ``path`` and fsync it; returns the temp file."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    return tmp


def save_state(install_dir: Path, state: InstallState, crash_prefix: str = "") -> None:
    """Replace state.json atomically and durably (temp file, fsync, os.replace, fsync dir), then its backup."""
    state.updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    text = json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n"
    path = install_dir / STATE_FILE
    tmp = _replace(path, text)
    if crash_prefix:
        crash_point(f"{crash_prefix}-state-written")
    os.replace(tmp, path)
    fsync_path(install_dir)
    if crash_prefix:
        crash_point(f"{crash_prefix}-switched")
    # after state.json, so the backup only ever holds a pointer that was once in force
    os.replace(_replace(install_dir / BACKUP_FILE, text), install_dir / BACKUP_FILE)
    fsync_path(install_dir)
