"""Validation, probation, rollback, block-list, restart recovery and crash safety of the update agent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compactai.bundle import GOLDEN_OUTPUTS_FILE
from compactai.runtime import ACTIVATION_STEPS, ProbationPolicy, UpdateAgent
from compactai.runtime.state import CRASH_ENV


def test_update_commits_and_keeps_previous_side_by_side(agent_v1, make_bundle):
    result = agent_v1.update(make_bundle(2, scale=3.0))
    assert result.status == "committed" and result.version == 2
    assert result.steps[:9] == ["fetch", "signature", "expiry", "version", "paths", "file set", "hashes",
                                "external data", "pickle"]
    state = agent_v1.state
    assert (state.active, state.previous, state.trial, state.highest_trusted) == (2, 1, False, 2)
    assert sorted(p.name for p in (agent_v1.install_dir / "versions").iterdir()) == ["1", "2"]
    assert agent_v1.active_dir() == agent_v1.install_dir / "versions" / "2"
    events = [e["event"] for e in agent_v1.events.read()]
    assert events == ["activated", "committed", "activated", "committed"]


def test_tar_bundle_installs(agent_v1, make_bundle):
    result = agent_v1.update(make_bundle(2, out="v2.tar.gz"))
    assert result.status == "committed", result


def test_golden_mismatch_is_refused_and_blocked(agent_v1, make_bundle, keys, resign):
    bundle = make_bundle(2)
    np.savez(bundle / GOLDEN_OUTPUTS_FILE, y=np.zeros((2, 4), np.float32))
    resign(bundle, keys[0])  # authentic, correctly signed, but the model does not reproduce its outputs
    result = agent_v1.update(bundle)
    assert (result.status, result.reason) == ("refused", "golden-mismatch")
    state = agent_v1.state
    assert state.active == 1 and 2 in state.blocked and state.highest_trusted == 2
    fixed = agent_v1.update(make_bundle(2))  # the same version number again: block-listed
    assert (fixed.status, fixed.reason) == ("refused", "blocked")
    assert agent_v1.update(make_bundle(3)).status == "committed"


def test_nan_in_probation_rolls_back_and_blocks(agent_v1, make_bundle):
    # Log(x) passes its self-test on positive golden inputs but returns NaN on the normal inputs of probation
    golden = {"x": np.full((2, 4), 1.5, np.float32)}
    result = agent_v1.update(make_bundle(2, op="Log", golden_inputs=golden))
    assert (result.status, result.reason, result.active) == ("rolled_back", "probation-failed", 1)
    assert "NaN" in result.message
    state = agent_v1.state
    assert state.active == 1 and not state.trial and "NaN" in state.blocked[2]
    assert sorted(p.name for p in (agent_v1.install_dir / "versions").iterdir()) == ["1"]
    assert agent_v1.counters()["events"]["rolled_back"] == 1
    again = agent_v1.update(make_bundle(2))
    assert (again.status, again.reason) == ("refused", "blocked")


def test_errors_on_real_requests_roll_back(agent_v1, make_bundle):
    result = agent_v1.update(make_bundle(2), watch=False)
    assert result.status == "trial" and agent_v1.state.trial
    monitor = agent_v1.begin_probation()
    monitor.record(1.0, [np.ones(4, np.float32)])
    monitor.record(error=RuntimeError("shape mismatch on a real request"))
    final = agent_v1.finish_probation(monitor)
    assert (final.status, final.active) == ("rolled_back", 1)
    assert "shape mismatch" in agent_v1.state.blocked[2]


def test_healthy_real_requests_commit(agent_v1, make_bundle):
    agent_v1.update(make_bundle(2), watch=False)
    monitor = agent_v1.begin_probation()
    for _ in range(3):
        monitor.record(0.1, [np.ones(4, np.float32)])
    assert agent_v1.finish_probation(monitor).status == "committed"
    assert (agent_v1.state.active, agent_v1.state.trial) == (2, False)


def test_trial_of_a_live_prober_is_left_alone_and_retried_once_it_is_gone(agent_v1, make_bundle, keys):
    agent_v1.update(make_bundle(2), watch=False)
    assert agent_v1.state.active == 2 and agent_v1.state.trial
    other = UpdateAgent(agent_v1.install_dir, [keys[1]])
    assert other.active_dir() == agent_v1.install_dir / "versions" / "2"  # still on probation in agent_v1
    assert other.state.trial and 2 not in other.state.blocked
    agent_v1.close()  # the prober is gone (as if its process died): the next start runs the probation again
    restarted = UpdateAgent(agent_v1.install_dir, [keys[1]], probation=ProbationPolicy(queries=2))
    assert restarted.active_dir() == agent_v1.install_dir / "versions" / "2"
    state = restarted.state
    assert (state.active, state.previous, state.trial) == (2, 1, False) and 2 not in state.blocked
    assert [e["event"] for e in restarted.events.read()][-2:] == ["probation-retried", "committed"]


def test_corrupted_active_version_falls_back_at_startup(agent_v1, make_bundle, keys):
    agent_v1.update(make_bundle(2))
    model = agent_v1.install_dir / "versions" / "2" / "model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    restarted = UpdateAgent(agent_v1.install_dir, [keys[1]])
    assert restarted.status()["active"] == 1
    assert restarted.events.read()[-1]["reason"] == "corrupt-install"


def _installed_versions(install: Path) -> list[str]:
    return sorted(p.name for p in (install / "versions").iterdir())


@pytest.mark.parametrize("step", ACTIVATION_STEPS)
def test_crash_at_each_activation_step_leaves_old_or_new(agent_v1, make_bundle, keys, step):
    """The agent process dies (os._exit, like a power cut) at ``step``; after restart exactly one
    complete version is active: the old one until the activation reached the disk, then the new
    one, whose interrupted probation is run again at the restart (and passes)."""
    install, bundle = agent_v1.install_dir, make_bundle(2, scale=3.0)
    public = keys[2]
    env = {**os.environ, CRASH_ENV: step}
    process = subprocess.run(
        [sys.executable, "-c", "from compactai.cli import main; main()", "update", "--source", str(bundle),
         "--install-dir", str(install), "--trusted-key", str(public), "--probation-queries", "2"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert process.returncode == 86, process.stderr  # it really died at the step
    restarted = UpdateAgent(install, [keys[1]])
    status = restarted.status()
    expected = 2 if ACTIVATION_STEPS.index(step) >= ACTIVATION_STEPS.index("activate-switched") else 1
    assert status["active"] == expected and not status["trial"]
    assert restarted._installed_ok(expected)  # every file of the active version matches its signed manifest
    manifest = json.loads((install / "versions" / str(expected) / "manifest.json").read_text())
    assert manifest["version"] == expected
    assert set(_installed_versions(install)) <= {"1", "2"} and str(expected) in _installed_versions(install)
    assert list((install / "staging").iterdir()) == [] and not (install / "state.json.tmp").exists()


def test_probation_policy_latency_verdict():
    from compactai.runtime import HealthMonitor

    monitor = HealthMonitor(ProbationPolicy(max_latency_ratio=2.0), baseline_latency_ms=1.0)
    for latency in (5.0, 6.0, 7.0):
        monitor.record(latency, [np.zeros(2, np.float32)])
    healthy, why = monitor.verdict()
    assert not healthy and "latency" in why
    assert HealthMonitor(ProbationPolicy(max_latency_ratio=None), baseline_latency_ms=1.0,
                         latencies_ms=[5.0]).verdict()[0]


def test_counters_are_exposed_in_prometheus_format(agent_v1, make_bundle):
    from prometheus_client import generate_latest

    bundle = make_bundle(2)
    (bundle / "extra.txt").write_text("x")
    agent_v1.update(bundle)
    text = generate_latest(agent_v1.events.registry).decode()
    assert 'compactai_update_refusals_total{reason="extra-file"} 1.0' in text
    assert 'compactai_update_events_total{event="refused"} 1.0' in text


def test_no_second_update_while_a_trial_is_on_probation(agent_v1, make_bundle):
    from compactai.errors import BadInputError

    agent_v1.update(make_bundle(2), watch=False)
    with pytest.raises(BadInputError, match="still on probation"):
        agent_v1.update(make_bundle(3))
    assert (agent_v1.state.active, agent_v1.state.previous) == (2, 1)
