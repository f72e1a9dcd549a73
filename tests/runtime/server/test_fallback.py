"""Edge/cloud fallback between two real servers: low confidence goes remote; a dead or hanging remote does not
fail the request, which comes back local and marked."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from compactai.runtime.server import FallbackPolicy
from tests.runtime.server.conftest import events, infer_body

CONFIDENT = [[10.0, 0.0, 0.0, 0.0]]  # local logits 20, 0, 0, 0: max softmax ~1
UNSURE = [[0.1, 0.1, 0.1, 0.1]]  # equal logits: max softmax 0.25


@pytest.fixture
def remote(serve, make_bundle, keys):
    """The "original" model on a second server: y = 3x, version 7."""
    return serve(make_bundle(7, name="tiny", scale=3.0), trusted_keys=[keys[1]])


def local_server(serve, make_bundle, keys, url: str, **policy):
    return serve(make_bundle(1, name="tiny", scale=2.0), trusted_keys=[keys[1]],
                 fallback=FallbackPolicy(url, **policy))


def test_low_confidence_reaches_the_remote_and_a_stopped_remote_answers_locally(serve, make_bundle, keys,
                                                                                  remote) -> None:
    local = local_server(serve, make_bundle, keys, remote.url, min_confidence=0.5, timeout_s=5.0)
    with httpx.Client(base_url=local.url, timeout=30) as client:
        sure = client.post("/v2/models/tiny/infer", json=infer_body(CONFIDENT)).json()
        assert sure["model_version"] == "1" and sure["parameters"] == {"served_by": "local"}
        assert sure["outputs"][0]["data"] == [20.0, 0.0, 0.0, 0.0]

        unsure = client.post("/v2/models/tiny/infer", json=infer_body(UNSURE)).json()
        assert unsure["model_version"] == "7"
        assert unsure["parameters"]["served_by"] == "remote"
        assert unsure["parameters"]["fallback_reason"] == "confidence"
        assert unsure["outputs"][0]["data"] == pytest.approx([0.3] * 4)

        remote.stop()
        failed = client.post("/v2/models/tiny/infer", json=infer_body(UNSURE))
        assert failed.status_code == 200
        body = failed.json()
        assert body["model_version"] == "1" and body["outputs"][0]["data"] == pytest.approx([0.2] * 4)
        assert body["parameters"]["served_by"] == "local" and body["parameters"]["fallback"] == "failed"
        assert body["parameters"]["fallback_error"].startswith("error")
        text = client.get("/metrics").text
    assert 'compactai_fallback_total{model="tiny",reason="confidence",result="remote"} 1.0' in text
    assert 'compactai_fallback_total{model="tiny",reason="confidence",result="failed"} 1.0' in text
    assert [e["result"] for e in events(local, "fallback")] == ["remote", "failed"]


@pytest.fixture
def hanging_remote() -> Iterator[str]:
    """A raw socket server that accepts connections and reads, but never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                accepted.append(conn)
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in accepted:
        conn.close()
    listener.close()


def test_a_hanging_remote_is_cut_at_the_deadline(serve, make_bundle, keys, hanging_remote: str) -> None:
    local = local_server(serve, make_bundle, keys, hanging_remote, min_confidence=0.5, timeout_s=0.3)
    with httpx.Client(base_url=local.url, timeout=30) as client:
        answer = client.post("/v2/models/tiny/infer", json=infer_body(UNSURE))
    assert answer.status_code == 200
    parameters = answer.json()["parameters"]
    # "timeout" is the deadline's own verdict (httpx's timeouts are set past it, so they cannot fire first)
    assert parameters == {"served_by": "local", "fallback": "failed", "fallback_reason": "confidence",
                          "fallback_error": "timeout"}


def test_a_user_rule_forwards_and_a_remote_with_other_outputs_is_a_failed_fallback(serve, make_bundle, keys,
                                                                                      remote) -> None:
    seen = []

    def rule(inputs, outputs) -> bool:
        seen.append(float(inputs["x"][0, 0]))
        return float(inputs["x"][0, 0]) < 0

    local = local_server(serve, make_bundle, keys, remote.url, rule=rule)
    with httpx.Client(base_url=local.url, timeout=30) as client:
        kept = client.post("/v2/models/tiny/infer", json=infer_body([[1.0, 0, 0, 0]])).json()
        sent = client.post("/v2/models/tiny/infer", json=infer_body([[-1.0, 0, 0, 0]])).json()
    assert seen == [1.0, -1.0]
    assert kept["parameters"]["served_by"] == "local" and "fallback" not in kept["parameters"]
    assert sent["parameters"]["served_by"] == "remote" and sent["parameters"]["fallback_reason"] == "rule"
    assert sent["outputs"][0]["data"] == [-3.0, 0.0, 0.0, 0.0]


def test_queue_rule_forwards_when_the_estimated_wait_is_too_long(serve, make_bundle, keys, remote) -> None:
    local = local_server(serve, make_bundle, keys, remote.url, max_queue_ms=0.0)
    # the estimate is requests ahead x mean compute time: make one request "ahead" of the next
    local.server.dispatcher.waiting += 1
    local.server.dispatcher._mean_compute_s = 0.01
    with httpx.Client(base_url=local.url, timeout=30) as client:
        body = client.post("/v2/models/tiny/infer", json=infer_body(CONFIDENT)).json()
    assert body["parameters"]["served_by"] == "remote" and body["parameters"]["fallback_reason"] == "queue"
    assert body["model_version"] == "7"
