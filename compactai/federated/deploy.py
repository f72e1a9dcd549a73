"""Running the federated apps on Flower's deployment engine: a SuperLink and SuperNodes.

``federate_deployment`` writes a small Flower App (a ``pyproject.toml`` naming the ServerApp and
ClientApp components, which live in the installed compactai) with the run's settings as its run
config, and submits it with Flower's own ``flwr run --stream`` to the SuperLink. The SuperLink runs
the ServerApp; the SuperNodes run the ClientApp on their own data. The ServerApp writes what it saw
(``record.json``, ``final.safetensors``) to the run's work directory on the SuperLink's machine,
which is read back here. See docs/federated.md for starting a SuperLink and SuperNodes on devices.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from compactai.errors import BadInputError, TechniqueError
from compactai.federated.config import FederatedConfig
from compactai.federated.local import evaluate, get_weights, set_weights

RECORD_FILE, FINAL_FILE, INITIAL_FILE = "record.json", "final.safetensors", "initial.safetensors"


def flwr_executable() -> str:
    """Flower's ``flwr`` CLI next to this interpreter, else on PATH."""
    beside = Path(sys.executable).with_name("flwr")
    found = str(beside) if beside.exists() else shutil.which("flwr")
    if not found:
        raise BadInputError("Flower's 'flwr' command is not installed; install it with: "
                            "pip install -c constraints.txt 'compactai[federated]'")
    return found


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def write_app(app_dir: Path, components: tuple[str, str], run_config: dict[str, Any]) -> Path:
    """A Flower App directory whose components are compactai's apps and whose run config is ours."""
    app_dir.mkdir(parents=True, exist_ok=True)
    lines = ["[build-system]", 'requires = ["hatchling"]', 'build-backend = "hatchling.build"', "",
             "[project]", 'name = "compactai-federate"', 'version = "1.0.0"',
             'description = "compactai federate: the run\'s ServerApp and ClientApp"', 'license = "Apache-2.0"',
             "dependencies = []", "", "[tool.flwr.app]", 'publisher = "compactai"', "",
             "[tool.flwr.app.components]", f'serverapp = "{components[0]}"', f'clientapp = "{components[1]}"', "",
             "[tool.flwr.app.config]"]
    lines += [f'"{key}" = {_toml(value)}' for key, value in run_config.items()]
    (app_dir / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return app_dir


def write_connection(flwr_home: Path, superlink: str, insecure: bool, root_certificates: str | None) -> None:
    """Flower's CLI configuration (FLWR_HOME/config.toml) with one SuperLink connection."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", 'default = "compactai"', "", "[superlink.compactai]", f"address = {_toml(superlink)}"]
    lines.append(f"insecure = {_toml(insecure)}")
    if root_certificates:
        lines.append(f"root-certificates = {_toml(root_certificates)}")
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def federate_deployment(module: Any, task: Any, config: FederatedConfig, *, superlink: str, insecure: bool,
                        components: tuple[str, str], run_config: dict[str, Any],
                        root_certificates: str | None = None, timeout_s: float = 3600.0) -> Any:
    """Run ``config`` through a running SuperLink and return a ``FederatedResult``.

    ``run_config`` tells the apps how to rebuild the model and find the data (example name,
    model spec); the initial weights travel from here to the ServerApp through the work directory."""
    from safetensors.numpy import load_file, save_file

    from compactai.federated.run import FederatedResult

    config.validate()
    with tempfile.TemporaryDirectory(prefix="compactai-federate-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        save_file(get_weights(module), str(work / INITIAL_FILE))
        app = write_app(Path(tmp) / "app", components,
                        {**run_config, "config": json.dumps(config.to_dict()), "work-dir": str(work)})
        write_connection(Path(tmp) / "flwr-home", superlink, insecure, root_certificates)
        env = {**os.environ, "FLWR_HOME": str(Path(tmp) / "flwr-home")}
        done = subprocess.run([flwr_executable(), "run", str(app), "compactai", "--stream"], env=env,
                              capture_output=True, text=True, timeout=timeout_s, check=False)
        if not (work / RECORD_FILE).exists():
            tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-4:])[-600:]
            raise TechniqueError(f"The Flower run on the SuperLink at {superlink} produced no result "
                                 f"(flwr run exited {done.returncode}: {tail}). Check that the SuperLink "
                                 "and at least as many SuperNodes as --clients are running.")
        record = json.loads((work / RECORD_FILE).read_text())
        final = load_file(str(work / FINAL_FILE))
    result_module = _copy(module)
    set_weights(result_module, final)
    test = task.split("test")
    return FederatedResult(module=result_module, rounds=[{**e, "clients": {int(k): v for k, v in e["clients"].items()}}
                                                         for e in record["rounds"]],
                           test=evaluate(result_module, test), round0_test=evaluate(module, test),
                           seconds=record["seconds"])


def save_record(work_dir: Path, record: Any) -> None:
    """The ServerApp's side: write what it saw where ``federate_deployment`` reads it."""
    from safetensors.numpy import save_file

    if record.final is not None:
        save_file({k: np.ascontiguousarray(v) for k, v in record.final.items()}, str(work_dir / FINAL_FILE))
    rounds = [{**e, "clients": {str(k): v for k, v in e["clients"].items()}} for e in record.rounds]
    tmp = work_dir / (RECORD_FILE + ".tmp")
    tmp.write_text(json.dumps({"rounds": rounds, "seconds": record.seconds}))
    os.replace(tmp, work_dir / RECORD_FILE)


def load_initial(work_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(work_dir / INITIAL_FILE)))


def _copy(module: Any) -> Any:
    import copy

    return copy.deepcopy(module)
