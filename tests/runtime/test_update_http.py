"""Updates over HTTP from a real local server on 127.0.0.1: a good bundle installs, oversize downloads stop."""

from __future__ import annotations

import pytest


def test_update_from_url(agent_v1, make_bundle, server):
    result = agent_v1.update(server.publish("v2", make_bundle(2)))
    assert result.status == "committed", result
    assert agent_v1.state.active == 2


def test_oversize_download_with_content_length(agent_v1, make_bundle, server):
    url = server.publish("v2", make_bundle(2))
    server.routes["/v2/model.onnx"] += b"\0" * 4096  # larger than the signed size
    result = agent_v1.update(url)
    assert (result.status, result.reason, agent_v1.state.active) == ("refused", "oversize", 1)
    assert "signed" in result.message


def test_endless_download_is_cut_off(agent_v1, make_bundle, server):
    bundle = make_bundle(2)
    url = server.publish("v2", bundle)
    server.endless.add("/v2/model.onnx")
    result = agent_v1.update(url)
    assert (result.status, result.reason, agent_v1.state.active) == ("refused", "oversize", 1)
    assert agent_v1.counters()["refusals"]["oversize"] == 1
    assert list((agent_v1.install_dir / "staging").iterdir()) == []


def test_unsigned_manifest_over_http_downloads_no_model(agent_v1, make_bundle, server):
    url = server.publish("v2", make_bundle(2))
    del server.routes["/v2/manifest.json.sig"]
    server.endless.add("/v2/model.onnx")  # would be noticed if it were requested
    result = agent_v1.update(url)
    assert (result.status, result.reason) == ("refused", "missing-signature")
    assert "/v2/model.onnx" not in server.sent


def test_missing_file_over_http(agent_v1, make_bundle, server):
    url = server.publish("v2", make_bundle(2))
    del server.routes["/v2/golden_outputs.npz"]
    result = agent_v1.update(url)
    assert (result.status, result.reason, agent_v1.state.active) == ("refused", "missing-file", 1)


def test_unreachable_url_is_a_clear_error_and_changes_nothing(agent_v1):
    import socket

    from compactai.errors import BadInputError

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(BadInputError, match="Cannot download"):
        agent_v1.update(f"http://127.0.0.1:{port}/v2/")
    assert agent_v1.state.active == 1 and agent_v1.events.read()[-1]["event"] == "failed"
    assert list((agent_v1.install_dir / "staging").iterdir()) == []
