"""Slow-retrieval attacks: a server that trickles one byte at a time must not hang the update agent,
and readers in other processes (status, active_dir) must answer while a download is stalled."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from compactai.runtime import ProbationPolicy, UpdateAgent

CLI = [sys.executable, "-c", "from compactai.cli import main; main()"]


def _wait_for_trickle(server, path: str, process: subprocess.Popen, seconds: float = 120.0) -> None:
    """Until the other process has received at least one trickled byte of ``path`` (it is stalled)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and process.poll() is None:
        if server.trickling.get(path, 0) >= 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"the writer never reached the trickled download (exit {process.poll()})")


def test_readers_answer_while_another_process_download_is_stalled(agent_v1, make_bundle, server, keys):
    """A real `compactai update` process downloads from a server sending 1 byte/s (and holds the
    install directory's writer lock); a status process and active_dir() here must still answer."""
    install, public = agent_v1.install_dir, keys[2]
    url = server.publish("v2", make_bundle(2))
    server.trickle["/v2/model.onnx"] = 1.0
    writer = subprocess.Popen([*CLI, "update", "--source", url, "--install-dir", str(install),
                               "--trusted-key", str(public)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_for_trickle(server, "/v2/model.onnx", writer)
        # generous bounds: this is a hang test (before the fix both waited for the writer's lock)
        status = subprocess.run([*CLI, "update", "--install-dir", str(install), "--trusted-key", str(public),
                                 "--json"], capture_output=True, text=True, timeout=25, check=False)
        answers: list[Path | None] = []
        reader = threading.Thread(target=lambda: answers.append(UpdateAgent(install, [keys[1]]).active_dir()),
                                  daemon=True)
        reader.start()
        reader.join(timeout=10)
        still_stalled = writer.poll() is None
    finally:
        writer.kill()
        writer.communicate()
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"]["active"] == 1
    assert answers == [install / "versions" / "1"]
    assert still_stalled  # the readers did not simply wait for the writer to give up


def test_download_deadline_refuses_a_trickle(agent_v1, make_bundle, server, keys):
    """The overall deadline holds although every single read is fast (1 byte every 0.5 s)."""
    url = server.publish("v2", make_bundle(2))
    server.trickle["/v2/model.onnx"] = 0.5
    process = subprocess.run([*CLI, "update", "--source", url, "--install-dir", str(agent_v1.install_dir),
                              "--trusted-key", str(keys[2]), "--download-deadline", "3",
                              "--min-download-rate", "0"], capture_output=True, text=True, timeout=120, check=False)
    assert process.returncode == 1, process.stderr
    assert "refused (slow-retrieval)" in process.stderr and "deadline" in process.stderr
    restarted = UpdateAgent(agent_v1.install_dir, [keys[1]])
    assert restarted.state.active == 1 and not restarted.state.trial
    assert list((agent_v1.install_dir / "staging").iterdir()) == []


def test_minimum_rate_refuses_a_trickle(tmp_path, make_bundle, server, keys):
    from compactai.runtime import UpdateLimits

    limits = UpdateLimits(download_deadline_s=600, min_download_rate=64, rate_window_s=2)
    agent = UpdateAgent(tmp_path / "install", [keys[1]], probation=ProbationPolicy(queries=2), limits=limits)
    assert agent.update(make_bundle(1)).status == "committed"
    url = server.publish("v2", make_bundle(2))
    server.trickle["/v2/model.onnx"] = 0.25
    result = agent.update(url)
    assert (result.status, result.reason, agent.state.active) == ("refused", "slow-retrieval", 1)
    assert "bytes/s" in result.message
    assert agent.counters()["refusals"]["slow-retrieval"] == 1


def test_silent_server_is_refused_after_one_window(agent_v1, make_bundle, server, keys):
    """Headers, then nothing: the read timeout is the rate window, not a fixed 30 s per read."""
    from compactai.runtime import UpdateLimits

    limits = UpdateLimits(download_deadline_s=600, min_download_rate=1, rate_window_s=1)
    agent = UpdateAgent(agent_v1.install_dir, [keys[1]], limits=limits)
    url = server.publish("v2", make_bundle(2))
    server.trickle["/v2/model.onnx"] = 30.0
    result = agent.update(url)
    assert (result.status, result.reason, agent.state.active) == ("refused", "slow-retrieval", 1)


def test_limits_that_would_disable_a_bound_are_bad_input():
    from compactai.errors import ParameterError
    from compactai.runtime import UpdateLimits

    for bad in ({"download_deadline_s": float("nan")}, {"download_deadline_s": 0}, {"min_download_rate": -1.0},
                {"rate_window_s": float("inf")}, {"max_version_jump": 0}):
        with pytest.raises(ParameterError, match="UpdateLimits"):
            UpdateLimits(**bad).check()
