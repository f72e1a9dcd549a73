"""Conventions shared by the publisher and the devices: where files live and what a target says.

A repository directory holds::

    metadata/            served: N.root.json (every version), root.json, timestamp.json,
                         N.snapshot.json, N.targets.json (consistent snapshots), and unversioned
                         snapshot.json / targets.json (the newest, for the publisher)
    targets/NAME/HASH.CHANNEL.tar   served: the bundles, one file per content (old ones stay)
    publisher.json       NOT served: expiry periods and the paths of the online (snapshot,
                         timestamp) key files; never a key itself

A device asks for the target ``NAME/CHANNEL.tar``: the newest bundle of that model on that
channel. The target's custom metadata (``custom.compactai``) holds name, version, semver, channel.
"""

from __future__ import annotations

import re
from typing import Any

from compactai.errors import BadInputError, ParameterError

METADATA_DIR = "metadata"
TARGETS_DIR = "targets"
PUBLISHER_FILE = "publisher.json"
DEFAULT_CHANNEL = "stable"
CUSTOM_KEY = "compactai"
ROLES = ("root", "targets", "snapshot", "timestamp")
ONLINE_ROLES = ("snapshot", "timestamp")
DEFAULT_EXPIRES = {"root": "365d", "targets": "90d", "snapshot": "7d", "timestamp": "1d"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def check_name(value: str, what: str) -> str:
    """A model or channel name that can be one path segment of a URL and of a file name."""
    if not _NAME.match(value) or value.endswith(".tar"):
        raise ParameterError(f"The {what} must be 1-128 letters, digits, '.', '_' or '-' (not starting with "
                             f"'.' or '-'). Got {value!r} instead.")
    return value


def target_path(name: str, channel: str) -> str:
    return f"{check_name(name, 'model name')}/{check_name(channel, 'channel')}.tar"


def parse_duration(text: str, what: str = "expiry") -> float:
    """Seconds from ``90s``, ``30m``, ``12h`` or ``7d``."""
    match = _DURATION.match(str(text).strip())
    if not match or float(match.group(1)) <= 0:
        raise ParameterError(f"The {what} must be a positive duration like 90s, 30m, 12h or 7d. Got {text!r} instead.")
    return float(match.group(1)) * _UNITS[match.group(2)]


def target_info(custom: dict[str, Any] | None, path: str) -> dict[str, Any]:
    """The compactai part of a target's custom metadata, checked for the fields a device relies on."""
    info = (custom or {}).get(CUSTOM_KEY)
    if not isinstance(info, dict) or not isinstance(info.get("version"), int) or isinstance(info["version"], bool) \
            or not isinstance(info.get("name"), str) or not isinstance(info.get("semver"), str):
        raise BadInputError(f"The target {path} has no compactai custom metadata (name, version, semver); publish "
                            "bundles with: compactai repo add REPO BUNDLE")
    return info
