"""Ed25519 keys and detached signatures (via the ``cryptography`` library).

Keys are PEM files: the private key PKCS#8 (written with mode 0600), the public key
SubjectPublicKeyInfo. A key id is the first 16 hex digits of the SHA-256 of the raw public
key, so a verifier can name the key a bundle claims without trusting it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from compactai.bundle.manifest import BundleRefused
from compactai.errors import BadInputError, ModelNotFoundError

PRIVATE_KEY_FILE = "bundle-signing.key"
PUBLIC_KEY_FILE = "bundle-signing.pub"
ALGORITHM = "ed25519"


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _write_key_file(path: Path, data: bytes, mode: int, replace: bool) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``, whatever the umask, never through a symlink.

    The bytes go to a fresh temp file in the same directory (O_CREAT|O_EXCL|O_NOFOLLOW, then
    fchmod), which is then linked into place (refusing any existing entry, a dangling symlink
    included) or, with ``replace``, renamed over it (a rename replaces a symlink, never its target).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask narrowed or, with umask 000, did not narrow the mode: set it exactly
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path, follow_symlinks=False)
            except FileExistsError as exc:
                raise BadInputError(f"{path} already exists; refusing to overwrite it (pass --force to replace "
                                    "the key pair).") from exc
    finally:
        tmp.unlink(missing_ok=True)


def generate_keypair(out_dir: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new key pair into ``out_dir``; returns (private key path, public key path).

    The private key file has mode 0600 from its first byte and the public key 0644, whatever the
    umask; neither is written through a symlink. Existing keys are not overwritten unless ``overwrite``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    if not overwrite and (os.path.lexists(private_path) or os.path.lexists(public_path)):
        raise BadInputError(f"A signing key already exists in {out}; refusing to overwrite it. "
                            "Choose another directory or delete the old key first.")
    private_key = Ed25519PrivateKey.generate()
    pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_key_file(private_path, pem, 0o600, overwrite)
    _write_key_file(public_path, public_pem, 0o644, overwrite)
    return private_path, public_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file; refuses keys that others can read."""
    file = Path(path)
    if not file.is_file():
        raise ModelNotFoundError(f"Signing key not found: {file}. Create one with: compactai keygen -o DIR")
    if os.name == "posix" and file.stat().st_mode & 0o077:
        raise BadInputError(f"The signing key {file} is readable by other users (mode "
                            f"{oct(file.stat().st_mode & 0o777)}); run: chmod 600 {file}")
    try:
        key = serialization.load_pem_private_key(file.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise BadInputError(f"{file} is not an unencrypted PEM private key ({exc}).") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BadInputError(f"{file} holds a {type(key).__name__}; bundles are signed with Ed25519 keys "
                            "from: compactai keygen -o DIR")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file."""
    file = Path(path)
    if not file.is_file():
        raise ModelNotFoundError(f"Trusted public key not found: {file}. It is the .pub file from compactai keygen.")
    try:
        key = serialization.load_pem_public_key(file.read_bytes())
    except ValueError as exc:
        raise BadInputError(f"{file} is not a PEM public key ({exc}).") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BadInputError(f"{file} holds a {type(key).__name__}; a trusted key must be an Ed25519 public key.")
    return key


def sign(private_key: Ed25519PrivateKey, message: bytes) -> bytes:
    """The detached signature file's bytes (JSON with algorithm, key id and base64 signature)."""
    document = {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(message)).decode(),
    }
    return (json.dumps(document, sort_keys=True, indent=2) + "\n").encode()


def verify_signature(message: bytes, signature_file: bytes | None, trusted: list[Ed25519PublicKey]) -> str:
    """Check a detached signature against the trusted keys; returns the key id that signed.

    Raises BundleRefused with reason ``missing-signature``, ``bad-signature`` or ``unknown-key``.
    """
    if signature_file is None:
        raise BundleRefused("missing-signature", "The bundle has no manifest.json.sig; unsigned bundles are refused.")
    try:
        document: Any = json.loads(signature_file.decode("utf-8"))
        claimed = str(document["key_id"])
        raw = base64.b64decode(document["signature"], validate=True)
        if document.get("algorithm") != ALGORITHM or len(raw) != 64:
            raise ValueError("not an ed25519 signature")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BundleRefused("bad-signature", f"manifest.json.sig is malformed ({exc}).") from exc
    keys = {key_id(k): k for k in trusted}
    if claimed not in keys:
        raise BundleRefused("unknown-key", f"The bundle is signed by key {claimed}, which is not a trusted key "
                                           f"(trusted: {', '.join(sorted(keys)) or 'none'}).")
    try:
        keys[claimed].verify(raw, message)
    except InvalidSignature as exc:
        raise BundleRefused("bad-signature", f"The signature of manifest.json does not verify with trusted key "
                                             f"{claimed}: the manifest was altered or signed by another key.") from exc
    return claimed
