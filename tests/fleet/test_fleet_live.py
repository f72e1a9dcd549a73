"""A device keeps answering while `compactai update --repo-url` replaces its model in another process.

(`compactai serve` is another issue; until it lands, the reader here does what a server does per
request: look up the active version without a lock and run its model.)
"""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np

from compactai.bundle import load_public_key
from compactai.runtime import UpdateAgent
from compactai.runtime.probation import OnnxModel

CLI = [sys.executable, "-c", "from compactai.cli import main; main()"]


def test_requests_keep_succeeding_while_the_device_updates_from_the_repository(fleet):
    fleet.publish(2)
    trusted = [load_public_key(fleet.bundle_key[1])]
    x = np.ones((1, 4), dtype=np.float32)
    answers: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def serve() -> None:
        reader = UpdateAgent(fleet.install, trusted)
        while not stop.is_set():
            try:
                active = reader.active_dir()
                assert active is not None
                answers.append(float(OnnxModel(active / "model.onnx").timed_run({"x": x})[1][0][0, 0]))
            except Exception as exc:  # noqa: BLE001 (any failure is a failed request, counted below)
                failures.append(repr(exc))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        done = subprocess.run([*CLI, "update", "--repo-url", fleet.server.url, "--trusted-root", fleet.trusted_root,
                               "--install-dir", fleet.install, "--trusted-key", fleet.bundle_key[1],
                               "--probation-queries", "4"], capture_output=True, text=True, timeout=300, check=False)
        for _ in range(600):  # until the reader has answered with the new version (at most ~30 s)
            if done.returncode != 0 or not thread.is_alive() or (answers and answers[-1] == 3.0):
                break
            stop.wait(0.05)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert done.returncode == 0, done.stderr
    assert failures == []
    assert answers[0] == 2.0 and answers[-1] == 3.0  # version v computes x * (v + 1)
    assert set(answers) == {2.0, 3.0}
