"""TUF keys from compactai's key files: the Ed25519 PEM pairs that ``compactai keygen`` writes.

A key argument is a keygen directory (its ``bundle-signing.key`` if present, else its ``.pub``),
a private key file (PKCS#8 PEM, mode 0600) or a public key file (SubjectPublicKeyInfo PEM).
A private key gives a securesystemslib ``CryptoSigner``; a public key only names a key (to add
to a role whose holder signs elsewhere, or to remove). Key ids are TUF's: the SHA-256 of the
key's canonical JSON, so they differ from the 16-digit ids on bundle signatures.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from securesystemslib.signer import CryptoSigner, SSlibKey

from compactai.bundle.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE, load_private_key, load_public_key
from compactai.errors import BadInputError, ModelNotFoundError

_KEYID = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class FleetKey:
    """A public TUF key and, when its private half was given, the signer that holds it."""

    key: SSlibKey
    signer: CryptoSigner | None = None
    path: Path | None = None

    @property
    def keyid(self) -> str:
        return str(self.key.keyid)

    @property
    def short(self) -> str:
        return self.keyid[:12]


def load_key(path: str | Path) -> FleetKey:
    """A key from a keygen directory, a private .key file or a public .pub file."""
    file = Path(path).expanduser()
    if file.is_dir():
        private, public = file / PRIVATE_KEY_FILE, file / PUBLIC_KEY_FILE
        if not (private.is_file() or public.is_file()):
            raise ModelNotFoundError(f"{file} holds no {PRIVATE_KEY_FILE} or {PUBLIC_KEY_FILE}; create a key "
                                     f"with: compactai keygen -o {file}")
        file = private if private.is_file() else public
    if not file.is_file():
        raise ModelNotFoundError(f"Key not found: {file}. Pass a key file or directory from: compactai keygen -o DIR")
    if b"PRIVATE KEY" in file.read_bytes()[:200]:
        private_key = load_private_key(file)  # refuses a key others can read
        tuf_key = SSlibKey.from_crypto(private_key.public_key())
        return FleetKey(tuf_key, CryptoSigner(private_key, tuf_key), file.resolve())
    return FleetKey(SSlibKey.from_crypto(load_public_key(file)), None, file.resolve())


def load_keys(paths: list[str] | list[Path]) -> list[FleetKey]:
    keys: dict[str, FleetKey] = {}
    for path in paths:
        loaded = load_key(path)
        if loaded.keyid not in keys or loaded.signer is not None:  # a private half wins over a public one
            keys[loaded.keyid] = loaded
    return list(keys.values())


def resolve_keyid(text: str) -> str:
    """A key id from a key path or a 64-digit TUF key id (as `compactai repo status` shows)."""
    if _KEYID.match(text.lower()):
        return text.lower()
    if Path(text).expanduser().exists():
        return load_key(text).keyid
    raise BadInputError(f"{text!r} is neither a key file/directory nor a 64-hex-digit TUF key id.")
