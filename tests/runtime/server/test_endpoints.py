"""Every KServe v2 endpoint and every client mistake, on a real uvicorn server from a real signed bundle."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import httpx
import numpy as np
import pytest

from compactai.bundle import BundleRefused, generate_keypair, load_private_key
from compactai.errors import BadInputError
from compactai.runtime.server import ModelServer, ServeConfig
from tests.runtime.server.conftest import events, infer_body


@pytest.fixture
def token() -> str:
    return secrets.token_urlsafe(24)


@pytest.fixture
def running(serve, make_bundle, keys, token):
    bundle = make_bundle(1, name="tiny")
    return serve(bundle, trusted_keys=[keys[1]], token=token, max_body_bytes=64 * 1024)


@pytest.fixture
def client(running, token):
    with httpx.Client(base_url=running.url, headers={"authorization": f"Bearer {token}"}, timeout=30) as c:
        yield c


def test_health_metadata_and_infer(client: httpx.Client) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    server = client.get("/v2").json()
    assert server["name"] == "compactai" and "binary_tensor_data" in server["extensions"]
    meta = client.get("/v2/models/tiny").json()
    assert meta["name"] == "tiny" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}]
    assert client.get("/v2/models/tiny/versions/1").json()["inputs"] == meta["inputs"]
    assert client.get("/v2/models/tiny/ready").json() == {"name": "tiny", "version": "1", "ready": True}
    assert client.get("/v2/models/tiny/versions/1/ready").json()["ready"] is True

    answer = client.post("/v2/models/tiny/infer", json=infer_body([[1, 2, 3, 4], [0.5, 0, 0, -1]], id="req-7"))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["model_name"] == "tiny" and body["model_version"] == "1" and body["id"] == "req-7"
    assert body["parameters"]["served_by"] == "local"
    assert body["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [2, 4],
                                "data": [2.0, 4.0, 6.0, 8.0, 1.0, 0.0, 0.0, -2.0]}]
    pinned = client.post("/v2/models/tiny/versions/1/infer", json=infer_body([[1, 1, 1, 1]], outputs=[{"name": "y"}]))
    assert pinned.json()["outputs"][0]["data"] == [2.0, 2.0, 2.0, 2.0]


def test_binary_tensor_extension(client: httpx.Client) -> None:
    data = np.arange(8, dtype=np.float32).reshape(2, 4)
    header = json.dumps({"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": data.nbytes}}],
                         "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
    answer = client.post("/v2/models/tiny/infer", content=header + data.tobytes(),
                         headers={"Inference-Header-Content-Length": str(len(header)),
                                  "content-type": "application/octet-stream"})
    assert answer.status_code == 200, answer.text
    length = int(answer.headers["inference-header-content-length"])
    meta = json.loads(answer.content[:length])
    assert meta["outputs"][0]["parameters"]["binary_data_size"] == 32
    np.testing.assert_array_equal(np.frombuffer(answer.content[length:], dtype="<f4").reshape(2, 4), data * 2)


def test_repository_and_metrics_and_drift(client: httpx.Client) -> None:
    assert client.post("/v2/repository/index").json() == [{"name": "tiny", "version": "1", "state": "READY",
                                                           "role": "serving"}]
    assert client.post("/v2/repository/models/tiny/unload").json()["unload"] is True
    assert client.get("/v2/health/ready").status_code == 503
    gone = client.post("/v2/models/tiny/infer", json=infer_body([[1, 2, 3, 4]]))
    assert gone.status_code == 404 and "load" in gone.json()["error"]
    assert client.post("/v2/repository/models/tiny/load").json() == {"name": "tiny", "version": "1", "load": True}
    assert client.post("/v2/models/tiny/infer", json=infer_body([[1, 2, 3, 4]])).status_code == 200
    drift = client.get("/v2/models/tiny/drift").json()
    assert drift["enabled"] is False and "no drift profile" in drift["message"]
    text = client.get("/metrics").text
    for name in ("compactai_requests_total", "compactai_request_duration_seconds_bucket",
                 "compactai_compute_duration_seconds_bucket", "compactai_queue_wait_seconds_bucket",
                 "compactai_batch_size_bucket", "compactai_inflight_requests", "compactai_model_info",
                 "compactai_model_size_bytes"):
        assert name in text, name
    assert 'compactai_requests_total{model="tiny",outcome="not_found",version=""} 1.0' in text
    assert 'compactai_model_info{model="tiny",runtime="onnxruntime",state="serving",version="1"} 1.0' in text


BAD_REQUESTS = [
    ("wrong shape", "/v2/models/tiny/infer", infer_body([[1, 2, 3]]), 400, "shape"),
    ("wrong datatype", "/v2/models/tiny/infer",
     {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "INT64", "data": [1, 2, 3, 4]}]}, 400, "FP32"),
    ("unknown datatype", "/v2/models/tiny/infer",
     {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP8", "data": [1, 2, 3, 4]}]}, 400, "datatype"),
    ("data not numbers", "/v2/models/tiny/infer",
     {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": ["a", "b", "c", "d"]}]}, 400, "FP32"),
    ("too few values", "/v2/models/tiny/infer",
     {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}, 400, "needs 8"),
    ("unknown input", "/v2/models/tiny/infer", infer_body([[1, 2, 3, 4]], name="z"), 400, "no input"),
    ("unknown output", "/v2/models/tiny/infer", infer_body([[1, 2, 3, 4]], outputs=[{"name": "q"}]), 400, "output"),
    ("no inputs", "/v2/models/tiny/infer", {"inputs": []}, 400, "inputs"),
    ("unknown model", "/v2/models/nope/infer", infer_body([[1, 2, 3, 4]]), 404, "Unknown model"),
    ("unknown version", "/v2/models/tiny/versions/9/infer", infer_body([[1, 2, 3, 4]]), 404, "version"),
]


@pytest.mark.parametrize(("what", "path", "body", "status", "says"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_client_mistakes_are_4xx_and_the_server_keeps_serving(client, what, path, body, status, says) -> None:
    answer = client.post(path, json=body)
    assert answer.status_code == status, answer.text
    assert says in answer.json()["error"]
    assert client.post("/v2/models/tiny/infer", json=infer_body([[1, 1, 1, 1]])).status_code == 200


def test_malformed_json_oversize_and_unknown_metadata(client: httpx.Client, running) -> None:
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        answer = client.post("/v2/models/tiny/infer", content=raw, headers={"content-type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"]
    bad_header = client.post("/v2/models/tiny/infer", content=b"{}", headers={"Inference-Header-Content-Length": "99"})
    assert bad_header.status_code == 400 and "Inference-Header-Content-Length" in bad_header.json()["error"]
    big = json.dumps(infer_body([[1.0, 2.0, 3.0, 4.0]] * 5000)).encode()  # about 100 KB, over the 64 KiB limit
    announced = client.post("/v2/models/tiny/infer", content=big, headers={"content-type": "application/json"})
    assert announced.status_code == 413 and "limit" in announced.json()["error"]
    # no Content-Length (chunked): the limit is enforced while the body streams in
    streamed = client.post("/v2/models/tiny/infer", content=(big[i:i + 8192] for i in range(0, len(big), 8192)))
    assert streamed.status_code == 413 and "limit" in streamed.json()["error"]
    assert client.get("/v2/models/nope").status_code == 404
    assert client.get("/v2/models/tiny/versions/3").status_code == 404
    assert client.get("/v2/models/tiny/versions/3/ready").status_code == 404
    assert client.get("/v2/no/such/route").json() == {"error": "No such route; see GET /v2 and the KServe v2 protocol."}
    assert client.post("/v2/models/tiny/infer", json=infer_body([[1, 1, 1, 1]])).status_code == 200
    text = client.get("/metrics").text
    assert 'outcome="too_large"' in text and 'outcome="bad_request"' in text


def test_missing_or_invalid_token_is_401(running, token: str) -> None:
    with httpx.Client(base_url=running.url, timeout=30) as anonymous:
        for headers in ({}, {"authorization": "Bearer wrong-token"}, {"authorization": f"Basic {token}"}):
            answer = anonymous.post("/v2/models/tiny/infer", json=infer_body([[1, 2, 3, 4]]), headers=headers)
            assert answer.status_code == 401 and "Bearer" in answer.json()["error"]
            assert answer.headers["www-authenticate"] == "Bearer"
        assert anonymous.post("/v2/repository/models/tiny/unload").status_code == 401
        assert anonymous.post("/v2/repository/index").status_code == 401
        assert anonymous.get("/v2/health/ready").status_code == 200  # probes stay open
        ok = anonymous.post("/v2/models/tiny/infer", json=infer_body([[1, 2, 3, 4]]),
                            headers={"authorization": f"Bearer {token}"})
        assert ok.status_code == 200
    refusals = events(running, "refusal")
    assert [r["reason"] for r in refusals[:2]] == ["missing token", "invalid token"]


def test_sources_refused_without_trust(make_bundle, tmp_path: Path, keys) -> None:
    bundle = make_bundle(1)
    with pytest.raises(BadInputError, match="--trusted-key"):
        ModelServer(bundle, ServeConfig())
    with pytest.raises(BadInputError, match="install directory"):
        ModelServer(bundle, ServeConfig(trusted_keys=[keys[1]], update_source=str(bundle)))
    stranger = load_private_key(generate_keypair(tmp_path / "stranger")[0])
    with pytest.raises(BundleRefused):
        ModelServer(make_bundle(2, key=stranger), ServeConfig(trusted_keys=[keys[1]]))


def test_serves_a_tar_bundle_and_a_plain_onnx(serve, make_bundle, keys, tmp_path: Path) -> None:
    archive = make_bundle(4, name="tiny", out="tiny-v4.tar.gz")
    model = tmp_path / "plain.onnx"
    model.write_bytes((make_bundle(5) / "model.onnx").read_bytes())
    for source, config, name, version in ((archive, {"trusted_keys": [keys[1]]}, "tiny", "4"),
                                          (model, {"name": "plain"}, "plain", "1")):
        running = serve(source, **config)
        with httpx.Client(base_url=running.url, timeout=30) as client:
            body = client.post(f"/v2/models/{name}/infer", json=infer_body([[1, 2, 3, 4]])).json()
        assert (body["model_name"], body["model_version"]) == (name, version)
        assert body["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]
