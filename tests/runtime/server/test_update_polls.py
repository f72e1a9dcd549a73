"""Polls of an update source: a .tar bundle source is peeked into (its manifest read from the
archive), so a new archive is rolled in and polls that bring nothing new stay quiet: no log line,
no event, nothing fetched."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest

from compactai.runtime import ProbationPolicy, load_state
from compactai.runtime.server.updates import peek_version
from tests.runtime.server.conftest import events, infer_body, wait_for


def test_tar_source_rolls_in_and_idle_polls_are_quiet(serve, make_bundle, keys, tmp_path: Path) -> None:
    source = tmp_path / "published.tar"
    os.replace(make_bundle(1, name="tiny", out="v1.tar"), source)
    assert peek_version(str(source)) == 1  # read from the archive, not "nothing published"
    install = tmp_path / "install"
    running = serve(install, trusted_keys=[keys[1]], update_source=str(source), poll_interval=0.05,
                    probation_requests=3, probation_timeout=0.5, probation=ProbationPolicy(queries=2))
    os.replace(make_bundle(2, name="tiny", scale=3.0, out="v2.tar"), source)  # atomic publish of a new archive
    wait_for(lambda: load_state(install).active == 2 and not load_state(install).trial, what="commit of v2")
    wait_for(lambda: running.server.model.probation is None, what="end of probation")
    with httpx.Client(base_url=running.url, timeout=30) as client:
        answer = client.post("/v2/models/tiny/infer", json=infer_body([[1, 1, 1, 1]])).json()
    assert answer["model_version"] == "2" and answer["outputs"][0]["data"] == [3.0] * 4

    log_lines = len(running.log.getvalue().splitlines())  # type: ignore[attr-defined]
    agent_events = (install / "events.jsonl").read_text()
    polls_before = len(running.server.updates.results)
    time.sleep(1.0)  # about 20 polls of a source that holds the installed version
    assert len(running.log.getvalue().splitlines()) == log_lines  # type: ignore[attr-defined]
    assert (install / "events.jsonl").read_text() == agent_events  # no refusal recorded per poll
    assert len(running.server.updates.results) == polls_before  # nothing was fetched
    assert [e["outcome"] for e in events(running, "update")].count("committed") == 2


def slow_model(path: Path, width: int = 512, layers: int = 8) -> Path:
    """Same signature as the tiny models (x: (batch, 4) -> y), but a chain of width x width MatMuls:
    hundreds of times the tiny model's compute per request."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shapes = [(4, width)] + [(width, width)] * layers + [(width, 4)]
    weights = [numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), f"w{i}")
               for i, s in enumerate(shapes)]
    names = ["x"] + [f"h{i}" for i in range(len(shapes) - 1)] + ["y"]
    nodes = [helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]]) for i in range(len(shapes))]
    graph = helper.make_graph(nodes, "slow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


# seen (serve3 branch): passed alone and in two full runs of tests/runtime/server at load 6 to 9, failed in a
# third run at load 9, so it looks load-dependent rather than order-dependent; the failure was not captured
@pytest.mark.skip(reason="flaky: passes on its own (3 s), but in some runs with other server tests v2 is not "
                  "rolled back within 60 s; not diagnosed yet (issue 17)")
def test_a_version_much_slower_on_live_requests_fails_probation(serve, make_bundle, keys, tmp_path: Path) -> None:
    from compactai.bundle import build_bundle
    from tests.runtime.server.test_updates import publish

    source = tmp_path / "published"
    publish(source, make_bundle(1, name="tiny"))
    install = tmp_path / "install"
    running = serve(install, trusted_keys=[keys[1]], update_source=str(source), poll_interval=0.1,
                    probation_requests=15, probation_timeout=120.0,
                    probation=ProbationPolicy(queries=4, max_latency_ratio=5.0, min_latency_increase_ms=0.05))
    with httpx.Client(base_url=running.url, timeout=30) as client:
        for _ in range(30):  # the yardstick: version 1's compute time on live requests
            assert client.post("/v2/models/tiny/infer", json=infer_body([[1, 2, 3, 4]])).status_code == 200
        build_bundle(slow_model(tmp_path / "slow.onnx"), tmp_path / "slow-v2", keys[0], 2, name="tiny")
        publish(source, tmp_path / "slow-v2")
        wait_for(lambda: running.server.model.probation is not None or 2 in load_state(install).blocked,
                 what="probation of v2")
        answers = []

        def rolled_back_after_another_request() -> bool:
            # probation counts live requests on v2: keep sending (a slow machine may route the first
            # ones before the switch) until the roll back is recorded
            answers.append(client.post("/v2/models/tiny/infer", json=infer_body([[1, 2, 3, 4]])))
            return 2 in load_state(install).blocked

        wait_for(rolled_back_after_another_request, what="roll back of v2")
        assert len(answers) >= 4  # the yardstick judged v2 on live requests, not on none
        assert all(a.status_code == 200 for a in answers)
        # traffic is back on version 1 before the roll back is recorded (updates.py)
        assert client.post("/v2/models/tiny/infer", json=infer_body([[1, 1, 1, 1]])).json()["model_version"] == "1"
    wait_for(lambda: "rolled_back" in [e["outcome"] for e in events(running, "update")], what="roll-back log")
    rolled = [e for e in events(running, "update") if e["outcome"] == "rolled_back"]
    assert len(rolled) == 1 and "median latency is" in rolled[0]["message"]
    assert "latency" in load_state(install).blocked[2]
