"""deploy/: the container recipe and the KServe manifests agree with each other and with the CLI."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path
from typing import Any

import typer
import yaml

from compactai.cli import _load_commands, app
from compactai.runtime.server import ModelServer, ServeConfig, create_app
from compactai.runtime.server.metrics import EventLog
from tests.runtime.conftest import tiny_model
from tests.runtime.server.conftest import REPO

DEPLOY = REPO / "deploy"


def serve_params(args: list[str]) -> dict[str, Any]:
    """Parse ``compactai serve ARGS`` with the real CLI (unknown options or bad values raise)."""
    _load_commands()
    command = typer.main.get_command(app).commands["serve"]  # type: ignore[attr-defined]  # a click Group
    return dict(command.make_context("serve", list(args)).params)


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kserve" / name).read_text())


def test_manifests_are_kserve_objects_that_fit_together() -> None:
    runtime, service = load("servingruntime.yaml"), load("inferenceservice.yaml")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1" and runtime["kind"] == "ServingRuntime"
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in [f["name"] for f in runtime["spec"]["supportedModelFormats"]]
    assert model["protocolVersion"] == "v2" and "v2" in runtime["spec"]["protocolVersions"]
    assert model["storageUri"]


def test_container_args_ports_and_probes_match_the_cli(tmp_path: Path) -> None:
    runtime = load("servingruntime.yaml")
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    params = serve_params(container["args"])
    defaults = serve_params(["model.onnx"])
    assert defaults["host"] == "127.0.0.1" and defaults["port"] == 8000  # safe defaults on a workstation...
    assert params["host"] == "0.0.0.0" and params["port"] == 8080  # ...so the container says what it needs
    assert params["source"] == Path("/mnt/models")  # where KServe's storage initializer puts storageUri
    assert [p["containerPort"] for p in container["ports"]] == [params["port"]]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in runtime["spec"]["volumes"]}
    assert set(mounts) <= volumes
    assert any(key.startswith(path + "/") for key in params["trusted_key"] for path in mounts.values())

    routes = {route.path for route in create_app(ModelServer(tiny_model(tmp_path / "m.onnx"), ServeConfig(),
                                              log=EventLog(io.StringIO()))).routes}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == params["port"]
        assert container[probe]["httpGet"]["path"] in routes

    dockerfile = (DEPLOY / "Dockerfile").read_text()

    def instruction(name: str) -> str:
        found = re.search(rf"^{name} (.+)$", dockerfile, re.M)
        assert found is not None, f"the Dockerfile has no {name}"
        return found.group(1)

    assert instruction("EXPOSE") == str(params["port"])
    assert json.loads(instruction("ENTRYPOINT")) == ["compactai", "serve"]
    cmd = serve_params(json.loads(instruction("CMD")))
    assert (cmd["host"], cmd["port"], cmd["source"]) == (params["host"], params["port"], params["source"])
    assert cmd["trusted_key"] == params["trusted_key"]
