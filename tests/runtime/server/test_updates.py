"""Updates inside a running server: a good version is committed, a bad one rolled back, the old one serving."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import httpx
import numpy as np

from compactai.runtime import ProbationPolicy, load_state
from compactai.runtime.server.updates import peek_version
from tests.runtime.server.conftest import events, infer_body, wait_for


def publish(link: Path, bundle: Path) -> None:
    """Point the update source at ``bundle`` atomically (a symlink replaced in one rename)."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(bundle.resolve())
    os.replace(tmp, link)


def bad_bundle(make_bundle, version: int) -> Path:
    """Passes verification (its golden inputs are positive) but y = log(x) gives NaN on live traffic."""
    golden = {"x": np.abs(np.random.default_rng(0).standard_normal((2, 4))).astype(np.float32) + 0.1}
    return make_bundle(version, op="Log", golden_inputs=golden, name="tiny")


def test_new_versions_roll_in_and_a_bad_one_rolls_back(serve, make_bundle, keys, tmp_path: Path) -> None:
    source = tmp_path / "published"
    publish(source, make_bundle(1, name="tiny"))
    install = tmp_path / "install"
    running = serve(install, trusted_keys=[keys[1]], update_source=str(source), poll_interval=0.1,
                    probation_requests=5, probation_timeout=0.5, probation=ProbationPolicy(queries=4))
    with httpx.Client(base_url=running.url, timeout=30) as client:
        def version() -> str:
            return client.post("/v2/models/tiny/infer", json=infer_body([[1, 1, 1, 1]])).json()["model_version"]

        assert version() == "1"  # installed at start-up from the update source
        publish(source, make_bundle(2, name="tiny", scale=3.0))
        wait_for(lambda: load_state(install).active == 2 and not load_state(install).trial, what="commit of v2")
        wait_for(lambda: running.server.model.probation is None, what="end of probation")
        answer = client.post("/v2/models/tiny/infer", json=infer_body([[1, 1, 1, 1]])).json()
        assert answer["model_version"] == "2" and answer["outputs"][0]["data"] == [3.0] * 4
        assert client.get("/v2/models/tiny").json()["versions"] == ["2"]  # v1 unloaded after the commit

        publish(source, bad_bundle(make_bundle, 3))
        wait_for(lambda: 3 in load_state(install).blocked, what="roll back of v3")
        # the roll back is on disk before the loop logs it: wait for its log line
        wait_for(lambda: "rolled_back" in [e["outcome"] for e in events(running, "update")], what="roll-back log")
        wait_for(lambda: running.server.model.probation is None, what="end of probation")
        assert load_state(install).active == 2
        assert version() == "2"
        text = client.get("/metrics").text
    outcomes = [e["outcome"] for e in events(running, "update")]
    assert outcomes[0] == "committed" and "rolled_back" in outcomes and outcomes.count("committed") == 2
    assert 'compactai_server_updates_total{model="tiny",outcome="rolled_back"} 1.0' in text
    assert 'compactai_update_events_total{event="rolled_back"} 1.0' in text  # the agent's own counters


def test_probation_on_live_requests_answers_bad_ones_with_the_previous_version(serve, make_bundle, keys,
                                                                               tmp_path: Path) -> None:
    source = tmp_path / "published"
    publish(source, make_bundle(1, name="tiny"))
    install = tmp_path / "install"
    running = serve(install, trusted_keys=[keys[1]], update_source=str(source), poll_interval=0.1,
                    probation_requests=50, probation_timeout=120.0)
    publish(source, bad_bundle(make_bundle, 2))
    wait_for(lambda: running.server.model.probation is not None or 2 in load_state(install).blocked,
             what="probation of v2")
    with httpx.Client(base_url=running.url, timeout=30) as client:
        for action in ("load", "unload"):  # the repository waits for the verdict
            busy = client.post(f"/v2/repository/models/tiny/{action}")
            assert busy.status_code == 409 and "probation" in busy.json()["error"]
        answers = [client.post("/v2/models/tiny/infer", json=infer_body([[-1.0, 2.0, 0.5, 1.0]])) for _ in range(3)]
    wait_for(lambda: 2 in load_state(install).blocked, what="roll back of v2")
    for answer in answers:
        assert answer.status_code == 200
        body = answer.json()
        # log(-1) is NaN: the probation saw it, and the previous version answered instead
        assert body["model_version"] == "1" and body["outputs"][0]["data"] == [-2.0, 4.0, 1.0, 2.0]
    assert load_state(install).active == 1
    assert running.server.model.slot().version == "1"


def test_peek_reads_the_claimed_version_from_a_directory_or_url(make_bundle, tmp_path: Path) -> None:
    from tests.runtime.conftest import BundleServer

    bundle = make_bundle(6)
    assert peek_version(str(bundle)) == 6
    assert peek_version(str(tmp_path / "nothing-yet")) == -1  # nothing published: nothing to do
    server = BundleServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        assert peek_version(server.publish("b", bundle)) == 6
        server.endless.add("/endless/manifest.json")
        assert peek_version(f"{server.url}/endless/") is None  # cut at the manifest size limit: the agent decides
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
