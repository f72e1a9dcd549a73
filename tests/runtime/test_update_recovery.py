"""Lock-outs: huge versions, a lost or corrupt state.json, a read-only install directory, and a
probation interrupted by a kill must never leave a device that refuses every later real update."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compactai.runtime import ProbationPolicy, UpdateAgent
from compactai.runtime.state import CRASH_ENV

CLI = [sys.executable, "-c", "from compactai.cli import main; main()"]


def _versions(install: Path) -> list[str]:
    return sorted(p.name for p in (install / "versions").iterdir())


def test_huge_signed_version_is_refused_and_later_versions_still_install(agent_v1, make_bundle):
    result = agent_v1.update(make_bundle(10**30))
    assert (result.status, result.reason) == ("refused", "version-bound")
    assert "2^53" in result.message and "rollback" in result.message
    assert agent_v1.state.highest_trusted == 1 and 10**30 not in agent_v1.state.blocked
    assert agent_v1.update(make_bundle(2)).status == "committed"


def test_version_jump_is_bounded(tmp_path, keys, make_bundle):
    from compactai.runtime import UpdateLimits

    agent = UpdateAgent(tmp_path / "install", [keys[1]], probation=ProbationPolicy(queries=2),
                        limits=UpdateLimits(max_version_jump=100))
    assert agent.update(make_bundle(100)).status == "committed"
    result = agent.update(make_bundle(201))
    assert (result.status, result.reason) == ("refused", "version-bound")
    assert "at most 100 above 100" in result.message
    assert agent.update(make_bundle(200)).status == "committed"


def test_missing_state_json_deletes_nothing_and_restores_the_pointer(agent_v1, make_bundle, keys):
    assert agent_v1.update(make_bundle(2)).status == "committed"
    install = agent_v1.install_dir
    (install / "state.json").unlink()
    restarted = UpdateAgent(install, [keys[1]])
    status = restarted.status()
    assert (status["active"], status["previous"], status["highest_trusted"]) == (2, 1, 2)
    assert _versions(install) == ["1", "2"]
    assert restarted.update(make_bundle(2)).reason == "rollback"  # rollback protection survived


def test_lost_state_and_backup_are_rebuilt_from_verified_versions(agent_v1, make_bundle, keys):
    assert agent_v1.update(make_bundle(2)).status == "committed"
    install = agent_v1.install_dir
    for path in install.glob("state.json*"):
        path.unlink()
    (install / "versions" / "7").mkdir()  # not a verified version: neither trusted nor deleted on a guess
    restarted = UpdateAgent(install, [keys[1]])
    assert restarted.active_dir() == install / "versions" / "2"
    status = restarted.status()
    assert (status["active"], status["previous"], status["highest_trusted"], status["trial"]) == (2, 1, 2, False)
    assert _versions(install) == ["1", "2", "7"]
    assert restarted.update(make_bundle(2)).reason == "rollback"
    assert restarted.update(make_bundle(3)).status == "committed"


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"active": "two", "blocked": 5}'])
def test_empty_or_corrupt_state_json_breaks_no_command(agent_v1, make_bundle, keys, content):
    assert agent_v1.update(make_bundle(2)).status == "committed"
    install = agent_v1.install_dir
    (install / "state.json").write_bytes(content)
    process = subprocess.run([*CLI, "update", "--install-dir", str(install), "--trusted-key", str(keys[2]),
                              "--json"], capture_output=True, text=True, timeout=120, check=False)
    assert process.returncode == 0, process.stderr
    assert json.loads(process.stdout)["status"]["active"] == 2
    restarted = UpdateAgent(install, [keys[1]], probation=ProbationPolicy(queries=2))
    assert restarted.update(make_bundle(3)).status == "committed"
    assert json.loads((install / "state.json").read_text())["active"] == 3


def test_read_only_install_dir_still_answers_status_and_active_dir(agent_v1, keys):
    """Readers never write: status and active_dir() work on a read-only install directory. Root ignores
    file modes, so as root the readers run in a new user namespace, where root's files obey them."""
    install = agent_v1.install_dir
    for path in [install, *install.rglob("*")]:
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
    unprivileged = ["unshare", "--user"] if os.geteuid() == 0 else []
    try:
        status = subprocess.run([*unprivileged, *CLI, "update", "--install-dir", str(install), "--trusted-key",
                                 str(keys[2]), "--json"], capture_output=True, text=True, timeout=120, check=False)
        active = subprocess.run([*unprivileged, sys.executable, "-c", (
            "import sys; from compactai.bundle import load_public_key; from compactai.runtime import UpdateAgent; "
            "print(UpdateAgent(sys.argv[1], [load_public_key(sys.argv[2])]).active_dir())"),
            str(install), str(keys[2])], capture_output=True, text=True, timeout=120, check=False)
        probe = subprocess.run([*unprivileged, "touch", str(install / "probe")], capture_output=True, check=False)
    finally:
        for path in [install, *install.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    assert probe.returncode != 0  # the readers really ran without write access
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"]["active"] == 1
    assert active.returncode == 0, active.stderr
    assert active.stdout.strip() == str(install / "versions" / "1")


def test_kill_during_probation_retries_the_good_version(agent_v1, make_bundle, keys):
    """kill -9 of a real `compactai update` while its new version is on probation: on the next start
    the probation is run again and the good version is committed, not block-listed."""
    install = agent_v1.install_dir
    writer = subprocess.Popen([*CLI, "update", "--source", str(make_bundle(2, scale=3.0)), "--install-dir",
                               str(install), "--trusted-key", str(keys[2]), "--probation-queries", "4000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and writer.poll() is None:
            try:
                if json.loads((install / "state.json").read_text()).get("trial"):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait(timeout=60)
    assert writer.returncode == -signal.SIGKILL  # it was killed on probation, not finished
    restarted = UpdateAgent(install, [keys[1]], probation=ProbationPolicy(queries=4))
    restarted.recover()
    state = restarted.state
    assert (state.active, state.trial, state.previous) == (2, False, 1) and 2 not in state.blocked
    assert [e["event"] for e in restarted.events.read()][-2:] == ["probation-retried", "committed"]


def test_probation_interrupted_every_time_is_finally_rolled_back(agent_v1, make_bundle, keys):
    """A version whose probation kills the process every time is not retried forever."""
    install = agent_v1.install_dir
    crash = {**os.environ, CRASH_ENV: "probation"}
    args = ["--install-dir", str(install), "--trusted-key", str(keys[2]), "--probation-queries", "2"]
    first = subprocess.run([*CLI, "update", "--source", str(make_bundle(2)), *args], env=crash,
                           capture_output=True, text=True, timeout=120, check=False)
    assert first.returncode == 86, first.stderr
    attempts = ProbationPolicy().max_attempts
    for _ in range(attempts - 1):  # each restart retries the probation, which dies again
        again = subprocess.run([*CLI, "update", *args], env=crash, capture_output=True, text=True, timeout=120,
                               check=False)
        assert again.returncode == 86, again.stderr
    restarted = UpdateAgent(install, [keys[1]])
    restarted.recover()
    state = restarted.state
    assert (state.active, state.trial) == (1, False) and "interrupted" in state.blocked[2]


def test_huge_version_over_http_is_refused_before_any_model_byte(agent_v1, make_bundle, server):
    url = server.publish("big", make_bundle(2**53))
    server.endless.add("/big/model.onnx")  # would be noticed if it were requested
    result = agent_v1.update(url)
    assert (result.status, result.reason, agent_v1.state.highest_trusted) == ("refused", "version-bound", 1)
    assert "/big/model.onnx" not in server.sent
