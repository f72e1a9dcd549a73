"""Polls of an update source: a .tar bundle source is peeked into (its manifest read from the
archive), so a new archive is rolled in and polls that bring nothing new stay quiet: no log line,
no event, nothing fetched."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

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
