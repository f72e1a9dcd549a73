"""Fixtures of the bundle tests: a signing key pair."""

from __future__ import annotations

from pathlib import Path

import pytest

from compactai.bundle import generate_keypair, load_private_key, load_public_key


@pytest.fixture
def signing_keys(tmp_path: Path):
    """(private key, public key, private key path) of a fresh pair."""
    private, public = generate_keypair(tmp_path / "keys")
    return load_private_key(private), load_public_key(public), private
