"""Updates over HTTP from a real local server on 127.0.0.1: a good bundle installs, oversize downloads stop."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


class BundleServer:
    """Serves bundle directories under /<name>/...; ``endless`` paths stream without Content-Length."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.endless: set[str] = set()
        self.sent: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                if self.path in server.endless:
                    self.send_response(200)
                    self.end_headers()
                    block, sent = b"\0" * 65536, 0
                    try:
                        while sent < 64 * 1024 * 1024:  # an "endless data" attack, bounded for the test
                            self.wfile.write(block)
                            sent += len(block)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    server.sent[self.path] = sent
                    return
                body = server.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def publish(self, name: str, bundle: Path) -> str:
        for path in bundle.rglob("*"):
            if path.is_file():
                self.routes[f"/{name}/{path.relative_to(bundle).as_posix()}"] = path.read_bytes()
        return f"{self.url}/{name}/"


@pytest.fixture
def server() -> Iterator[BundleServer]:
    served = BundleServer()
    thread = threading.Thread(target=served.httpd.serve_forever, daemon=True)
    thread.start()
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


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
