"""The device's side of a fleet repository: python-tuf's ``ngclient.Updater`` and how stale its metadata is.

TUF answers "is this the newest, untampered, authorised bundle for this model and channel": the
Updater walks the root chain from the trusted root.json, then timestamp, snapshot and targets,
checking signatures and thresholds, versions (no rollback), expiry (no freeze), lengths and
hashes (no endless data, no swapped files, no mix-and-match). Every failure becomes a
:class:`~compactai.bundle.BundleRefused` with a stable reason, so the update agent's event log and
counters treat it like any other refusal. The bundle's own checks come after, in the agent.

State under ``state_dir`` (the install directory's ``fleet/``)::

    metadata/      ngclient's trusted metadata (root_history/, root.json, timestamp.json, ...)
    downloads/     the target being downloaded (removed once handed over)
    refresh.json   the last attempt and the last successful refresh, for staleness reports
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, Timestamp
from tuf.api.serialization import DeserializationError
from tuf.ngclient import FetcherInterface, Updater, UpdaterConfig

from compactai.bundle.manifest import BundleRefused, format_time
from compactai.errors import BadInputError, ModelNotFoundError
from compactai.fleet.layout import METADATA_DIR, TARGETS_DIR, target_info, target_path

REFRESH_FILE = "refresh.json"
# TUF's failures, most specific first, as (exception type, reason, what it means for the operator)
_REASONS: list[tuple[type[Exception], str, str]] = [
    (tuf_errors.ExpiredMetadataError, "tuf-expired", "the repository's metadata has expired (a frozen mirror or "
                                                     "a stopped refresh-timestamp job)"),
    (tuf_errors.BadVersionNumberError, "tuf-rollback", "the repository offered older metadata than this device "
                                                       "already trusts (a rollback or mix-and-match)"),
    (tuf_errors.UnsignedMetadataError, "tuf-signature", "metadata lacks the threshold of valid signatures from "
                                                        "the keys the trusted root names"),
    (tuf_errors.LengthOrHashMismatchError, "tuf-hash-mismatch", "a file does not match the length and hashes "
                                                                "that the signed metadata gives for it"),
    (tuf_errors.DownloadLengthMismatchError, "oversize", "the server sent more bytes than the signed length "
                                                         "(endless data)"),
    (tuf_errors.SlowRetrievalError, "slow-retrieval", "the server was too slow"),
    (tuf_errors.DownloadHTTPError, "download-failed", "the server answered with an HTTP error"),
    (tuf_errors.RepositoryError, "tuf-metadata", "the repository's metadata is invalid"),
]


def refusal(exc: BaseException) -> BundleRefused | None:
    """The BundleRefused for a TUF (or pacing) failure; None for other errors (network, disk)."""
    seen: BaseException | None = exc
    while seen is not None:  # ngclient wraps a fetcher's own errors in DownloadError: look at the cause too
        if isinstance(seen, BundleRefused):
            return seen
        seen = seen.__cause__
    for kind, reason, meaning in _REASONS:
        if isinstance(exc, kind):
            detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            return BundleRefused(reason, f"TUF refused the update: {meaning} ({detail}).")
    return None


@dataclass
class TargetChoice:
    """The newest bundle of a model on a channel, as the verified targets metadata describes it."""

    path: str
    name: str
    version: int
    semver: str
    channel: str
    length: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FleetClient:
    """One refresh-and-download session against the repository at ``repo_url`` (serving metadata/ and targets/)."""

    def __init__(self, repo_url: str, trusted_root: str | Path, state_dir: str | Path, *,
                 fetcher: FetcherInterface | None = None) -> None:
        self.repo_url = repo_url.rstrip("/") + "/"
        self.trusted_root = Path(trusted_root)
        self.state_dir = Path(state_dir)
        self.fetcher = fetcher
        self._updater: Updater | None = None

    @property
    def metadata_dir(self) -> Path:
        return self.state_dir / METADATA_DIR

    def refresh(self) -> None:
        """Refresh root, timestamp, snapshot and targets; raise BundleRefused if TUF refuses them."""
        if not self.trusted_root.is_file():
            raise ModelNotFoundError(f"Trusted root not found: {self.trusted_root}. Copy metadata/root.json of the "
                                     "repository to the device when you provision it.")
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        attempt = time.time()
        try:
            # the trusted root is the bootstrap each time: newer roots cached in metadata_dir are
            # accepted only through the chain of signatures that starts at it
            updater = Updater(str(self.metadata_dir), self.repo_url + METADATA_DIR + "/",
                              str(self.state_dir / "downloads"), self.repo_url + TARGETS_DIR + "/",
                              fetcher=self.fetcher, config=UpdaterConfig(max_root_rotations=64),
                              bootstrap=self.trusted_root.read_bytes())
            updater.refresh()
        except Exception as exc:  # noqa: BLE001 (every failure is recorded for the staleness report, then re-raised)
            self._record(attempt, exc)
            self._reraise(exc)
        self._record(attempt, None)
        self._updater = updater

    def choose(self, name: str, channel: str) -> TargetChoice | None:
        """The target for ``name`` on ``channel`` in the refreshed metadata (None if it has none)."""
        updater = self._require()
        path = target_path(name, channel)
        try:
            target = updater.get_targetinfo(path)
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError, BundleRefused) as exc:
            self._reraise(exc)
        if target is None:
            return None
        info = target_info(target.custom, path)
        if info["name"] != name or info.get("channel", channel) != channel:
            raise BundleRefused("target-mismatch", f"The target {path} claims model {info['name']!r} on channel "
                                                   f"{info.get('channel')!r}; the repository is misconfigured.")
        return TargetChoice(path, name, int(info["version"]), str(info["semver"]), channel, target.length,
                            str(target.hashes.get("sha256", "")))

    def download(self, choice: TargetChoice, dest: Path) -> Path:
        """Download the chosen target to ``dest``; its length and hashes are checked against the metadata."""
        updater = self._require()
        target = updater.get_targetinfo(choice.path)
        if target is None:
            raise BundleRefused("no-target", f"The target {choice.path} disappeared from the metadata.")
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            return Path(updater.download_target(target, str(dest)))
        except (tuf_errors.RepositoryError, tuf_errors.DownloadError, BundleRefused) as exc:
            dest.unlink(missing_ok=True)
            self._reraise(exc)

    def _require(self) -> Updater:
        if self._updater is None:
            raise RuntimeError("call FleetClient.refresh() first")
        return self._updater

    def _reraise(self, exc: BaseException) -> NoReturn:
        """Raise ``exc`` as a BundleRefused (TUF refused), a BadInputError (network) or as it is."""
        refused = refusal(exc)
        if refused is exc:
            raise exc
        if refused is not None:
            raise refused from exc
        if isinstance(exc, tuf_errors.DownloadError):
            cause = f" ({exc.__cause__})" if exc.__cause__ else ""
            raise BadInputError(f"Cannot download from the repository {self.repo_url}: {exc}{cause}. Check "
                                "--repo-url and the network.") from exc
        raise exc

    def _record(self, attempt: float, exc: BaseException | None) -> None:
        """Keep the last attempt and the last success on disk (refresh.json), for the staleness report."""
        record = _read_json(self.state_dir / REFRESH_FILE)
        record["last_attempt"] = format_time(attempt)
        if exc is None:
            record.update(last_refresh=format_time(attempt), last_error=None, last_reason=None)
        else:
            refused = refusal(exc)
            record["last_reason"] = refused.reason if refused else type(exc).__name__
            record["last_error"] = (str(refused or exc).splitlines() or [""])[0][:300]
        tmp = self.state_dir / (REFRESH_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, self.state_dir / REFRESH_FILE)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def metadata_staleness(state_dir: str | Path, now: float | None = None) -> dict[str, Any]:
    """How stale the device's trusted metadata is: the newest trusted timestamp's version and expiry,
    the trusted root version, the last successful refresh and the last attempt's outcome."""
    from compactai.bundle.manifest import parse_time

    state = Path(state_dir)
    clock = time.time() if now is None else now
    record = _read_json(state / REFRESH_FILE)
    report: dict[str, Any] = {"last_refresh": record.get("last_refresh"), "last_attempt": record.get("last_attempt"),
                              "last_reason": record.get("last_reason"), "last_error": record.get("last_error"),
                              "seconds_since_refresh": None, "timestamp_version": None, "timestamp_expires": None,
                              "seconds_to_expiry": None, "expired": None, "root_version": None}
    if record.get("last_refresh"):
        report["seconds_since_refresh"] = round(clock - parse_time(record["last_refresh"]), 1)
    metadata = state / METADATA_DIR
    try:  # written by ngclient only after it verified them
        timestamp = Metadata[Timestamp].from_file(str(metadata / "timestamp.json")).signed
        root = Metadata[Root].from_file(str(metadata / "root.json")).signed
    except (OSError, ValueError, DeserializationError):
        return report
    expires = timestamp.expires.timestamp()
    report.update(timestamp_version=timestamp.version, timestamp_expires=format_time(expires),
                  seconds_to_expiry=round(expires - clock, 1), expired=expires <= clock, root_version=root.version)
    return report
