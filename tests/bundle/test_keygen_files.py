"""keygen writes its two files itself: never through a symlink, and with fixed modes whatever the umask."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest

from compactai.bundle import generate_keypair, load_private_key, load_public_key
from compactai.bundle.signing import PRIVATE_KEY_FILE, PUBLIC_KEY_FILE
from compactai.errors import BadInputError


@pytest.mark.parametrize("name", [PUBLIC_KEY_FILE, PRIVATE_KEY_FILE])
def test_keygen_never_follows_a_symlink_at_a_key_path(tmp_path, name):
    out, victim = tmp_path / "keys", tmp_path / "victim.txt"
    out.mkdir()
    (out / name).symlink_to(victim)  # dangling: following it would create the victim
    with pytest.raises(BadInputError, match="already exists"):
        generate_keypair(out)
    assert not victim.exists()
    victim.write_text("do not touch")
    private, public = generate_keypair(out, overwrite=True)
    assert victim.read_text() == "do not touch"
    assert not (out / name).is_symlink() and (out / name).is_file()
    load_private_key(private), load_public_key(public)


def test_keygen_modes_do_not_depend_on_the_umask(tmp_path):
    process = subprocess.run([sys.executable, "-c", "from compactai.cli import main; main()", "keygen", "-o",
                              str(tmp_path / "k")], capture_output=True, text=True, timeout=120, check=False,
                             umask=0)
    assert process.returncode == 0, process.stderr
    assert stat.S_IMODE((tmp_path / "k" / PRIVATE_KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "k" / PUBLIC_KEY_FILE).stat().st_mode) == 0o644
    assert list((tmp_path / "k").iterdir()) and not list((tmp_path / "k").glob("*.tmp*"))


def test_keygen_force_replaces_both_keys(tmp_path):
    private, public = generate_keypair(tmp_path)
    old = public.read_bytes()
    generate_keypair(tmp_path, overwrite=True)
    assert public.read_bytes() != old and stat.S_IMODE(private.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([PRIVATE_KEY_FILE, PUBLIC_KEY_FILE])
