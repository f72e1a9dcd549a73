"""The update agent: fetch, verify, validate, activate atomically, watch on probation, commit or roll back.

It follows The Update Framework's threat model (signatures, freeze, rollback, mix-and-match,
endless data) and the A/B practice of embedded updaters: versions side by side, one atomic
pointer switch (``state.json``, see :mod:`compactai.runtime.state`), a trial that must be
committed, and an automatic roll back, with the bad version block-listed, when it is not.

    agent = UpdateAgent("/var/lib/model", [load_public_key("publisher.pub")])
    result = agent.update("https://updates.example/model/v7/")   # or a directory / .tar
    agent.active_dir()                                            # what to serve
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compactai.bundle.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, BundleRefused, parse_manifest
from compactai.bundle.signing import Ed25519PublicKey, verify_signature
from compactai.bundle.verify import (
    FILE_CHECKS,
    VerifyPolicy,
    load_arrays,
    read_metadata,
    validate_model,
    verify_bundle,
)
from compactai.errors import BadInputError
from compactai.runtime.events import UpdateEvents
from compactai.runtime.fetch import fetch
from compactai.runtime.limits import UpdateLimits
from compactai.runtime.locks import FileLock
from compactai.runtime.probation import (
    HealthMonitor,
    OnnxModel,
    ProbationPolicy,
    median_latency_ms,
    probation_requests,
)
from compactai.runtime.state import (
    BACKUP_FILE,
    EVENTS_FILE,
    STAGING_DIR,
    STATE_FILE,
    VERSIONS_DIR,
    InstallState,
    crash_point,
    fsync_path,
    fsync_tree,
    recover_pointer,
    save_state,
)

# steps of one update at which the crash hook (COMPACTAI_UPDATE_CRASH_AT) can kill the agent, in order
ACTIVATION_STEPS = (
    "fetched", "verified", "synced", "moved", "activate-state-written", "activate-switched",
    "probation", "commit-state-written", "commit-switched",
)
# refusals of an authentic (correctly signed) bundle that is broken: block-list its version for good
BROKEN_MODEL_REASONS = ("golden-mismatch", "invalid-model")


@dataclass
class UpdateResult:
    """What one update attempt did: ``status`` is committed, trial, refused or rolled_back (or, from a fleet
    repository, current: the active version is already the newest)."""

    status: str
    version: int | None
    active: int | None
    reason: str | None = None
    message: str = ""
    steps: list[str] = field(default_factory=list)
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status in ("committed", "trial", "current")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class UpdateAgent:
    """Installs signed bundles into ``install_dir`` for the holders of ``trusted_keys``."""

    def __init__(self, install_dir: str | Path, trusted_keys: list[Ed25519PublicKey], *,
                 probation: ProbationPolicy | None = None, limits: UpdateLimits | None = None,
                 now: float | None = None) -> None:
        self.install_dir = Path(install_dir)
        self.trusted_keys = list(trusted_keys)
        self.probation = probation or ProbationPolicy()
        self.limits = (limits or UpdateLimits()).check()
        self.now = now
        self.events = UpdateEvents(self.install_dir / EVENTS_FILE)
        self._recovered = False
        # the writer's lock (one update at a time) and the probation lease: held by whoever runs
        # the probation of the trial, released by the kernel if that process dies, so a trial whose
        # lease is free was interrupted and is retried
        self._lock = FileLock(self.install_dir / ".lock")
        self._lease = FileLock(self.install_dir / ".probation.lock")

    # ---- state (read without any lock: readers must answer while a writer works or stalls) -------------
    @property
    def state(self) -> InstallState:
        return self._read_state()[0]

    def version_dir(self, version: int) -> Path:
        return self.install_dir / VERSIONS_DIR / str(version)

    def active_dir(self) -> Path | None:
        """The directory of the version to serve (None before the first install).

        Never waits: recovery runs first only if no other process holds the install directory
        and it is writable; otherwise the pointer is read as it stands.
        """
        self._try_recover()
        active = self.state.active
        return None if active is None else self.version_dir(active)

    def counters(self) -> dict[str, dict[str, float]]:
        return self.events.counters()

    def close(self) -> None:
        """Let go of the probation lease (a trial left on probation is then retried by the next start)."""
        self._lease.release()

    def status(self) -> dict[str, Any]:
        """The pointer and the active version's name and semver; never waits for a writer (see active_dir)."""
        self._try_recover()
        state, source = self._read_state()
        info: dict[str, Any] = {"install_dir": str(self.install_dir), **state.to_dict(), "state_source": source}
        if state.active is not None:
            manifest = parse_manifest(read_metadata(self.version_dir(state.active))[0])
            info["active_name"], info["active_semver"] = manifest["name"], manifest["semver"]
            info["active_dir"] = str(self.version_dir(state.active))
        return info

    def _read_state(self) -> tuple[InstallState, str]:
        """(state, source): see :func:`~compactai.runtime.state.recover_pointer`; never writes."""
        return recover_pointer(self.install_dir, self._installed_ok)

    @contextmanager
    def _locked(self, blocking: bool = True) -> Iterator[None]:
        """One writer at a time per install directory (an flock, released by the kernel if we die)."""
        if self._lock.held:
            yield
            return
        self.install_dir.mkdir(parents=True, exist_ok=True)
        if not self._lock.acquire(blocking=blocking):
            raise BlockingIOError(f"another process is updating {self.install_dir}")
        try:
            yield
        finally:
            self._lock.release()

    def _try_recover(self) -> None:
        """recover() if the install directory is free and writable; else read as is (a reader never waits)."""
        if self._recovered or not self.install_dir.is_dir() or not os.access(self.install_dir, os.W_OK):
            return
        try:
            with self._locked(blocking=False):
                self.recover()
        except BlockingIOError:
            return  # a writer holds the directory: it runs the recovery itself
        except PermissionError:
            return  # read-only for us (e.g. the lock file): nothing can be repaired, reading still works

    # ---- start-up ----------------------------------------------------------------------------------------
    def recover(self) -> None:
        """Bring the install directory to a clean state after a crash (run once, before any other work).

        Drops half-written state files and staging leftovers, restores a lost or corrupt pointer
        (from its backup or the installed, verified versions), runs the probation of a trial whose
        prober died again (rolled back after ``max_attempts``), falls back to the previous version if
        the active one no longer verifies, and removes versions that a stored pointer does not name.
        """
        if self._recovered:
            return
        with self._locked():
            for sub in (VERSIONS_DIR, STAGING_DIR):
                (self.install_dir / sub).mkdir(parents=True, exist_ok=True)
            for name in (STATE_FILE, BACKUP_FILE):
                (self.install_dir / (name + ".tmp")).unlink(missing_ok=True)
            for leftover in (self.install_dir / STAGING_DIR).iterdir():
                shutil.rmtree(leftover, ignore_errors=True)
            self._recovered = True
            state, source = self._read_state()
            if source in ("backup", "rebuilt"):
                self.events.record("state-restored", source=source, active=state.active, previous=state.previous,
                                   highest_trusted=state.highest_trusted)
                save_state(self.install_dir, state)
            if state.trial:
                state = self._resume_probation(state)
            if state.active is not None and not self._installed_ok(state.active):
                fallback = state.previous if state.previous is not None and self._installed_ok(state.previous) else None
                self.events.record("refused", reason="corrupt-install", version=state.active,
                                   message=f"installed version {state.active} no longer verifies; "
                                           f"falling back to {fallback}")
                state.blocked[state.active] = "installed files no longer verify"
                state.active, state.previous = fallback, None
                save_state(self.install_dir, state)
            if source == "state":  # never delete on a guess: only a pointer that was really stored rules
                self._collect_garbage()

    def _installed_ok(self, version: int) -> bool:
        """Whether versions/<version> holds that very version, signed by a trusted key, every file intact."""
        root = self.version_dir(version)
        try:
            manifest_bytes, signature = read_metadata(root)
            verify_signature(manifest_bytes, signature, self.trusted_keys)
            manifest = parse_manifest(manifest_bytes)
            if manifest["version"] != version:
                return False
            for _name, check in FILE_CHECKS:
                check(root, manifest)
        except (BundleRefused, OSError):
            return False
        return True

    def _collect_garbage(self) -> None:
        state = self.state
        keep = {str(v) for v in (state.active, state.previous) if v is not None}
        for path in (self.install_dir / VERSIONS_DIR).iterdir():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    # ---- update ------------------------------------------------------------------------------------------
    def update(self, source: str | Path, *, watch: bool = True) -> UpdateResult:
        """Install the bundle at ``source`` (directory, .tar or URL) if it passes every check.

        With ``watch`` the new version runs its probation at once (golden inputs plus synthesized
        requests) and is committed or rolled back; without, it stays a trial until the caller
        feeds :meth:`begin_probation`'s monitor with real requests and calls :meth:`finish_probation`.
        """
        self.recover()
        with self._locked():
            state = self.state
            if state.trial:
                raise BadInputError(f"Version {state.active} is still on probation; call finish_probation() "
                                    "before installing another update.")
            policy = VerifyPolicy(self.trusted_keys, now=self.now, highest_trusted=state.highest_trusted,
                                  blocked=dict(state.blocked))
            staging = Path(tempfile.mkdtemp(prefix="update-", dir=self.install_dir / STAGING_DIR))
            steps: list[str] = []
            manifest: dict[str, Any] | None = None
            try:
                fetch(source, staging, policy, self.limits)
                steps.append("fetch")
                crash_point("fetched")
                verified = verify_bundle(staging, policy, validate=False)
                # before the self-test: a broken bundle is block-listed and raises the rollback floor
                self.limits.check_version(verified.version, state.highest_trusted)
                manifest = verified.manifest
                steps += verified.steps
                validation = validate_model(staging, manifest)
                steps.append("self-test")
                crash_point("verified")
            except BundleRefused as refusal:
                claimed = _claimed_version(staging)
                shutil.rmtree(staging, ignore_errors=True)
                return self._refused(refusal, manifest, steps, state, claimed)
            except BaseException as exc:  # not a refusal: a network error, a missing source, Ctrl-C, ...
                shutil.rmtree(staging, ignore_errors=True)
                self.events.record("failed", error=type(exc).__name__, message=str(exc).splitlines()[0][:300]
                                   if str(exc) else "", active=state.active)
                raise
            version = verified.version
            self._activate(staging, version, state)
            steps.append("activate")
            self.events.record("activated", version=version, previous=state.active, name=manifest["name"],
                               semver=manifest["semver"])
            result = UpdateResult("trial", version, version, steps=steps, validation=validation,
                                  message=f"version {version} is active on probation")
            if not watch:
                return result
            monitor = self.begin_probation()
            self._probe(monitor, version)
            steps.append("probation")
            final = self.finish_probation(monitor)
            final.steps, final.validation = steps, validation
            return final

    def _refused(self, refusal: BundleRefused, manifest: dict[str, Any] | None, steps: list[str],
                 state: InstallState, claimed: int | None = None) -> UpdateResult:
        version = int(manifest["version"]) if manifest else None
        self.events.record("refused", reason=refusal.reason, version=version, claimed_version=claimed,
                           message=str(refusal), active=state.active)
        if manifest is not None and refusal.reason in BROKEN_MODEL_REASONS and version is not None:
            state.blocked[version] = f"{refusal.reason}: {refusal}"
            state.highest_trusted = max(state.highest_trusted, version)
            save_state(self.install_dir, state)
            self.events.record("blocked", version=version, reason=refusal.reason)
        return UpdateResult("refused", version, state.active, refusal.reason, str(refusal), steps)

    def _activate(self, staging: Path, version: int, state: InstallState) -> None:
        if not self._lease.acquire(blocking=False):
            shutil.rmtree(staging, ignore_errors=True)
            raise BadInputError(f"Another process is running a probation in {self.install_dir}; retry when it ends.")
        fsync_tree(staging)
        crash_point("synced")
        target = self.version_dir(version)
        if target.exists():  # a leftover of an interrupted attempt at this very version
            shutil.rmtree(target)
        staging.rename(target)  # same filesystem: atomic
        fsync_path(target.parent)
        fsync_path(staging.parent)
        crash_point("moved")
        new_state = InstallState(active=version, previous=state.active, trial=True, probation_attempts=1,
                                 highest_trusted=max(state.highest_trusted, version), blocked=dict(state.blocked))
        save_state(self.install_dir, new_state, crash_prefix="activate")

    # ---- probation ---------------------------------------------------------------------------------------
    def begin_probation(self) -> HealthMonitor:
        """A monitor for the active trial version; the latency yardstick is the previous version's median."""
        state = self.state
        if not state.trial or state.active is None:
            raise BundleRefused("no-trial", "No version is on probation.")
        monitor = HealthMonitor(self.probation)
        if state.previous is not None and self.probation.max_latency_ratio is not None:
            requests = self._requests(state.active)
            previous = OnnxModel(self.version_dir(state.previous) / "model.onnx")
            monitor.baseline_latency_ms = median_latency_ms(previous, requests)
        return monitor

    def _requests(self, version: int) -> list[dict[str, Any]]:
        root = self.version_dir(version)
        manifest = parse_manifest(read_metadata(root)[0])
        golden = load_arrays(root / manifest["golden"]["inputs"])
        return probation_requests(root / manifest["model"], golden, self.probation.queries)

    def _probe(self, monitor: HealthMonitor, version: int) -> None:
        root = self.version_dir(version)
        try:
            model = OnnxModel(root / parse_manifest(read_metadata(root)[0])["model"])
        except Exception as exc:  # noqa: BLE001 (best effort: any failure means "not available")
            monitor.record(error=exc)
            return
        requests = self._requests(version)
        # warm-up, not recorded: first runs allocate and are slow; the recorded run of the same
        # request records any error
        with contextlib.suppress(Exception):
            model.timed_run(requests[0])
        for i, feeds in enumerate(requests):
            try:
                latency, outputs = model.timed_run(feeds)
                monitor.record(latency, outputs)
            except Exception as exc:  # noqa: BLE001 (best effort: any failure means "not available")
                monitor.record(error=exc)
            if i == 0:
                crash_point("probation")

    def finish_probation(self, monitor: HealthMonitor) -> UpdateResult:
        """Commit the trial if the monitor is healthy, else roll back and block-list it."""
        with self._locked():
            state = self.state
            version = state.active
            healthy, why = monitor.verdict()
            if healthy:
                state.trial, state.probation_attempts = False, 0
                save_state(self.install_dir, state, crash_prefix="commit")
                self._lease.release()
                self.events.record("committed", version=version, detail=why)
                self._collect_garbage()
                return UpdateResult("committed", version, version, message=f"version {version} committed: {why}")
            self._rollback(state, f"probation failed: {why}")
            active = self.state.active
            return UpdateResult("rolled_back", version, active, "probation-failed",
                                f"version {version} rolled back to {active}: probation failed: {why}")

    def _resume_probation(self, state: InstallState) -> InstallState:
        """A trial found at start-up: leave it to a live prober, else run its probation again (a kill
        must not condemn a good version), up to ``max_attempts`` probations in all."""
        version = state.active
        if version is None or self._lease.held or not self._lease.acquire(blocking=False):
            return state  # this agent or another live process is running its probation
        if state.probation_attempts >= self.probation.max_attempts:
            self._rollback(state, f"probation interrupted {state.probation_attempts} times: the process died "
                                  "during each one")
            return self.state
        state.probation_attempts += 1
        save_state(self.install_dir, state)
        self.events.record("probation-retried", version=version, attempt=state.probation_attempts,
                           reason="the process running the probation stopped before its verdict")
        monitor = self.begin_probation()
        self._probe(monitor, version)
        self.finish_probation(monitor)
        return self.state

    def _rollback(self, state: InstallState, reason: str) -> None:
        bad = state.active
        if bad is not None:
            state.blocked[bad] = reason
        state.active, state.previous, state.trial, state.probation_attempts = state.previous, None, False, 0
        save_state(self.install_dir, state)
        self._lease.release()
        self.events.record("rolled_back", version=bad, active=state.active, reason=reason)
        self._collect_garbage()


def _claimed_version(staging: Path) -> int | None:
    """The version an unverified manifest claims, for the event log only (never trusted)."""
    try:
        value = json.loads((staging / MANIFEST_FILE).read_bytes()[:MAX_MANIFEST_BYTES]).get("version")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) else None
