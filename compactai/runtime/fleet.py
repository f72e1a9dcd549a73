"""Updates from a fleet repository (TUF): python-tuf picks and fetches the bundle, the agent installs it.

TUF answers "is this the newest, untampered, authorised bundle for this device's model and
channel" (:mod:`compactai.fleet.device`); the agent answers "is it safe to run and does it compute
what was signed" (signature of the bundle itself, file set, pickle refusal, golden self-test) and
keeps its atomic activation, probation and rollback. Every TUF download (metadata and the bundle)
shares one deadline and minimum rate from :class:`~compactai.runtime.limits.UpdateLimits`.

    agent = UpdateAgent("/var/lib/model", [load_public_key("publisher.pub")])
    update_from_repository(agent, "https://models.example/repo/", "root.json", channel="stable")
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tuf.api import exceptions as tuf_errors
from tuf.ngclient import FetcherInterface

from compactai.bundle.manifest import MAX_MANIFEST_BYTES, BundleRefused, parse_manifest
from compactai.bundle.stage import read_archive_metadata
from compactai.errors import BadInputError
from compactai.fleet.device import FleetClient, metadata_staleness
from compactai.fleet.layout import DEFAULT_CHANNEL, check_name
from compactai.runtime.agent import UpdateAgent, UpdateResult
from compactai.runtime.fetch import Pace
from compactai.runtime.limits import UpdateLimits
from compactai.runtime.locks import FileLock

FLEET_DIR = "fleet"


class PacedFetcher(FetcherInterface):
    """ngclient's fetcher with the agent's bounds: one overall deadline and minimum rate for every
    file of an update (TUF's slow-retrieval attack), no redirects, identity encoding."""

    def __init__(self, limits: UpdateLimits) -> None:
        import httpx

        self.pace = Pace(limits)
        self._client = httpx.Client(follow_redirects=False, headers={"Accept-Encoding": "identity"})

    def close(self) -> None:
        self._client.close()

    def _fetch(self, url: str) -> Iterator[bytes]:
        import httpx

        request = self._client.build_request("GET", url, timeout=self.pace.timeout())
        try:
            response = self._client.send(request, stream=True)
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout, httpx.ConnectTimeout):
            self.pace.silent()
            raise  # unreachable: silent() raises
        if response.status_code != 200:
            response.close()
            raise tuf_errors.DownloadHTTPError(f"GET {url} answered HTTP {response.status_code}",
                                               response.status_code)
        return self._chunks(response)

    def _chunks(self, response: Any) -> Iterator[bytes]:
        import httpx

        try:
            # iter_raw yields each block as it arrives, so a trickle still reaches the pace checks
            for block in response.iter_raw():
                self.pace.add(len(block))
                yield block
        except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
            self.pace.silent()
        except httpx.HTTPError as exc:  # e.g. the server hung up mid-file: a download error, as ngclient expects
            raise tuf_errors.DownloadError(f"GET {response.url} failed mid-file: {exc}") from exc
        finally:
            response.close()


def fleet_dir(agent: UpdateAgent) -> Path:
    return agent.install_dir / FLEET_DIR


def fleet_status(agent: UpdateAgent) -> dict[str, Any]:
    """How stale the device's TUF metadata is (see :func:`compactai.fleet.metadata_staleness`)."""
    return metadata_staleness(fleet_dir(agent))


def update_from_repository(agent: UpdateAgent, repo_url: str, trusted_root: str | Path, *,
                           model: str | None = None, channel: str = DEFAULT_CHANNEL,
                           watch: bool = True) -> UpdateResult:
    """Refresh the TUF metadata, download the newest bundle of ``model`` on ``channel`` and hand it to
    ``agent.update``. ``model`` defaults to the active version's name. Status ``current`` means the
    active version is already the newest; a TUF refusal is a ``refused`` result like the agent's own."""
    check_name(channel, "channel")
    agent.recover()
    state = agent.state
    name = model or (agent.status().get("active_name") if state.active is not None else None)
    if not name:
        raise BadInputError("Nothing is installed yet, so the model to fetch is unknown: pass --model NAME "
                            "(the bundle's name in the repository).")
    check_name(name, "model name")
    base = fleet_dir(agent)
    base.mkdir(parents=True, exist_ok=True)
    lock = FileLock(base / ".lock")  # ngclient's metadata directory takes one writer at a time
    lock.acquire()
    fetcher = PacedFetcher(agent.limits)
    steps: list[str] = []
    try:
        client = FleetClient(repo_url, trusted_root, base, fetcher=fetcher)
        try:
            client.refresh()
            steps.append("tuf-refresh")
            choice = client.choose(name, channel)
            if choice is None:
                raise BadInputError(f"The repository {repo_url} has no bundle of {name!r} on channel {channel!r}; "
                                    f"publish one with: compactai repo add REPO BUNDLE --channel {channel}")
            if choice.version == state.active and not state.trial:
                return UpdateResult("current", choice.version, state.active, steps=steps,
                                    message=f"version {choice.version} ({choice.semver}) is the newest on {channel}")
            if choice.version in state.blocked:
                raise BundleRefused("blocked", f"The newest {name} on {channel}, version {choice.version}, is "
                                               f"block-listed on this device: {state.blocked[choice.version]}")
            if choice.version <= state.highest_trusted:
                raise BundleRefused("rollback", f"The newest {name} on {channel} is version {choice.version}, not "
                                                f"newer than version {state.highest_trusted} that this device trusted.")
            agent.limits.check_version(choice.version, state.highest_trusted)
            download = client.download(choice, base / "downloads" / f"{name}.{channel}.tar")
            steps.append("tuf-download")
            staged = _check_target(download, choice.name, choice.version)
        except BundleRefused as refused:
            agent.events.record("refused", reason=refused.reason, message=str(refused), active=state.active,
                                source="fleet")
            return UpdateResult("refused", None, state.active, refused.reason, str(refused), steps)
    finally:
        fetcher.close()
        lock.release()
    try:
        result = agent.update(staged, watch=watch)
    finally:
        download.unlink(missing_ok=True)
    result.steps = steps + result.steps
    return result


def _check_target(archive: Path, name: str, version: int) -> Path:
    """Check that the downloaded bundle archive is the model and version its signed target names.

    Only the archive's manifest is read here (bounded, nothing extracted); the agent then stages
    the archive itself, verifying the bundle's signature before it extracts any listed file."""
    try:
        raw, _signature = read_archive_metadata(archive)
        manifest = parse_manifest(raw[:MAX_MANIFEST_BYTES + 1])  # compared only; the agent verifies in full
        if manifest["name"] != name or manifest["version"] != version:
            raise BundleRefused("target-mismatch", f"The target promises {name} v{version} but holds "
                                                   f"{manifest['name']} v{manifest['version']}; refused.")
    except BaseException:
        archive.unlink(missing_ok=True)
        raise
    return archive
