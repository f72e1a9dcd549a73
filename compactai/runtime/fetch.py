"""Fetch a bundle into a staging directory: from a local directory, a tar archive, or an HTTP(S) URL.

From a URL the metadata comes first (manifest.json and its signature), is checked for
signature, expiry and version before any model byte is downloaded, and then each listed
file is streamed with a hard limit of its signed size: a server that sends more is cut off.
The whole download has a deadline and a minimum rate (:class:`~compactai.runtime.limits.UpdateLimits`),
so a server that sends one byte at a time is cut off too (reason ``slow-retrieval``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from compactai.bundle.manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    MAX_SIGNATURE_BYTES,
    SIGNATURE_FILE,
    BundleRefused,
)
from compactai.bundle.stage import stage_bundle
from compactai.bundle.verify import VerifyPolicy, verify_metadata
from compactai.errors import BadInputError, ModelNotFoundError
from compactai.runtime.limits import UpdateLimits


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def fetch(source: str | Path, staging: Path, policy: VerifyPolicy, limits: UpdateLimits | None = None) -> None:
    """Put the bundle at ``source`` into the (empty) directory ``staging``."""
    text = str(source)
    if is_url(text):
        fetch_url(text, staging, policy, limits)
        return
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"Update source not found: {path}. Pass a bundle directory, a .tar bundle or a URL.")
    # the signed metadata is verified first; then only the listed files are copied or extracted
    stage_bundle(path, staging, policy)


class Pace:
    """The deadline and minimum rate of one download (all its files), checked as each block arrives."""

    def __init__(self, limits: UpdateLimits) -> None:
        self.limits = limits
        self.start = self.window_start = time.monotonic()
        self.deadline = self.start + limits.download_deadline_s
        self.received = self.window_bytes = 0

    def timeout(self) -> Any:
        """The timeouts of the next request: no read may wait longer than a rate window or the deadline."""
        import httpx

        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self._too_slow(f"it did not finish within the {self.limits.download_deadline_s:g} s deadline")
        read = min(self.limits.rate_window_s, remaining)
        return httpx.Timeout(read, connect=min(self.limits.connect_timeout_s, remaining))

    def add(self, count: int) -> None:
        now = time.monotonic()
        self.received += count
        self.window_bytes += count
        if now > self.deadline:
            self._too_slow(f"it did not finish within the {self.limits.download_deadline_s:g} s deadline")
        elapsed = now - self.window_start
        if elapsed >= self.limits.rate_window_s:
            rate = self.window_bytes / elapsed
            if rate < self.limits.min_download_rate:
                self._too_slow(f"it ran at {rate:.1f} bytes/s over {elapsed:.0f} s, below the minimum of "
                               f"{self.limits.min_download_rate:g} bytes/s")
            self.window_start, self.window_bytes = now, 0

    def silent(self) -> None:
        self._too_slow(f"the server sent nothing for {self.limits.rate_window_s:g} s (or the deadline of "
                       f"{self.limits.download_deadline_s:g} s passed)")

    def _too_slow(self, why: str) -> None:
        raise BundleRefused("slow-retrieval", f"The download was stopped after {self.received} bytes: {why} "
                                              "(a stalled or slow-retrieval server). Retry later, or raise "
                                              "--download-deadline / lower --min-download-rate for a slow link.")


def _download(client: Any, url: str, target: Path, limit: int, what: str, pace: Pace) -> bool:
    """Stream ``url`` into ``target``, refusing more than ``limit`` bytes; False on HTTP 404."""
    with client.stream("GET", url, timeout=pace.timeout()) as response:
        if response.status_code == 404:
            return False
        if response.status_code != 200:
            raise BundleRefused("download-failed", f"GET {url} answered HTTP {response.status_code}.")
        announced = response.headers.get("content-length")
        if announced is not None and announced.isdigit() and int(announced) > limit:
            raise BundleRefused("oversize", f"{what} is announced as {announced} bytes, more than the {limit} "
                                            "bytes signed; the download was refused.")
        received = 0
        with target.open("wb") as out:
            # iter_raw yields each block as it arrives (iter_bytes(n) would wait for n bytes, so a
            # trickle would never reach the checks); identity encoding is asked for, and the
            # signed hashes catch any other
            for block in response.iter_raw():
                received += len(block)
                if received > limit:
                    raise BundleRefused("oversize", f"{what} sent more than the {limit} bytes signed; the "
                                                    "download was stopped.")
                pace.add(len(block))
                out.write(block)
    return True


def fetch_url(base: str, staging: Path, policy: VerifyPolicy, limits: UpdateLimits | None = None) -> None:
    """Download a bundle served as a directory at ``base`` (``base/manifest.json``, ``base/model.onnx``, ...)."""
    import httpx

    from compactai.bundle.verify import check_manifest_paths

    limits = limits or UpdateLimits()
    pace = Pace(limits)
    base = base.rstrip("/") + "/"
    try:
        with httpx.Client(follow_redirects=False, headers={"Accept-Encoding": "identity"}) as client:
            if not _download(client, base + MANIFEST_FILE, staging / MANIFEST_FILE, MAX_MANIFEST_BYTES,
                             MANIFEST_FILE, pace):
                raise BundleRefused("missing-manifest", f"{base} serves no manifest.json; it is not a bundle.")
            has_signature = _download(client, base + SIGNATURE_FILE, staging / SIGNATURE_FILE,
                                      MAX_SIGNATURE_BYTES, SIGNATURE_FILE, pace)
            manifest_bytes = (staging / MANIFEST_FILE).read_bytes()
            signature = (staging / SIGNATURE_FILE).read_bytes() if has_signature else None
            manifest, _ = verify_metadata(manifest_bytes, signature, policy)  # before any model byte
            limits.check_version(int(manifest["version"]), policy.highest_trusted)
            check_manifest_paths(manifest)  # names become URLs and local paths: check them first
            for entry in manifest["files"]:
                target = staging / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                if not _download(client, base + quote(entry["path"]), target, int(entry["size"]), entry["path"],
                                 pace):
                    raise BundleRefused("missing-file", f"{base} does not serve {entry['path']}, which the "
                                                        "manifest lists.")
    except (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout):
        pace.silent()
    except httpx.HTTPError as exc:
        raise BadInputError(f"Cannot download the update from {base}: {exc}. Check the URL and the network.") from exc
