"""Fetch a bundle into a staging directory: from a local directory, a tar archive, or an HTTP(S) URL.

From a URL the metadata comes first (manifest.json and its signature), is checked for
signature, expiry and version before any model byte is downloaded, and then each listed
file is streamed with a hard limit of its signed size: a server that sends more is cut off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from compactai.bundle.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, SIGNATURE_FILE, BundleRefused
from compactai.bundle.stage import stage_bundle
from compactai.bundle.verify import VerifyPolicy, verify_metadata
from compactai.errors import BadInputError, ModelNotFoundError

MAX_SIGNATURE_BYTES = 4096


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def fetch(source: str | Path, staging: Path, policy: VerifyPolicy, timeout: float = 30.0) -> None:
    """Put the bundle at ``source`` into the (empty) directory ``staging``."""
    text = str(source)
    if is_url(text):
        fetch_url(text, staging, policy, timeout)
        return
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"Update source not found: {path}. Pass a bundle directory, a .tar bundle or a URL.")
    # the signed metadata is verified first; then only the listed files are copied or extracted
    stage_bundle(path, staging, policy)


def _download(client: Any, url: str, target: Path, limit: int, what: str) -> bool:
    """Stream ``url`` into ``target``, refusing more than ``limit`` bytes; False on HTTP 404."""
    with client.stream("GET", url) as response:
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
            for block in response.iter_bytes(1 << 16):
                received += len(block)
                if received > limit:
                    raise BundleRefused("oversize", f"{what} sent more than the {limit} bytes signed; the "
                                                    "download was stopped.")
                out.write(block)
    return True


def fetch_url(base: str, staging: Path, policy: VerifyPolicy, timeout: float = 30.0) -> None:
    """Download a bundle served as a directory at ``base`` (``base/manifest.json``, ``base/model.onnx``, ...)."""
    import httpx

    from compactai.bundle.verify import check_manifest_paths

    base = base.rstrip("/") + "/"
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            if not _download(client, base + MANIFEST_FILE, staging / MANIFEST_FILE, MAX_MANIFEST_BYTES,
                             MANIFEST_FILE):
                raise BundleRefused("missing-manifest", f"{base} serves no manifest.json; it is not a bundle.")
            has_signature = _download(client, base + SIGNATURE_FILE, staging / SIGNATURE_FILE,
                                      MAX_SIGNATURE_BYTES, SIGNATURE_FILE)
            manifest_bytes = (staging / MANIFEST_FILE).read_bytes()
            signature = (staging / SIGNATURE_FILE).read_bytes() if has_signature else None
            manifest, _ = verify_metadata(manifest_bytes, signature, policy)  # before any model byte
            check_manifest_paths(manifest)  # names become URLs and local paths: check them first
            for entry in manifest["files"]:
                target = staging / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                if not _download(client, base + quote(entry["path"]), target, int(entry["size"]), entry["path"]):
                    raise BundleRefused("missing-file", f"{base} does not serve {entry['path']}, which the "
                                                        "manifest lists.")
    except httpx.HTTPError as exc:
        raise BadInputError(f"Cannot download the update from {base}: {exc}. Check the URL and the network.") from exc
