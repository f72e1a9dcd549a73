"""Fixtures of the bundle tests: a signing key pair (loaded keys, or the two key files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from compactai.bundle import generate_keypair, load_private_key, load_public_key


@pytest.fixture
def signing_keys(tmp_path: Path):
    """(private key, public key, private key path) of a fresh pair."""
    private, public = generate_keypair(tmp_path / "keys")
    return load_private_key(private), load_public_key(public), private


@pytest.fixture
def keypair(tmp_path: Path) -> tuple[Path, Path]:
    """(private key path, public key path) of a fresh pair."""
    return generate_keypair(tmp_path / "keys")
