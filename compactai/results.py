"""The output directory every command writes: ``model.onnx`` and ``results.json``.

results.json schema (plain data; other commands and ``compactai bundle`` read it)::

    {
      "command": "quantize" | "prune" | "distill" | "optimize" | ...,
      "created": ISO time, "seed": int, "environment": {...},
      "model": {"name", "kind", "path": "model.onnx", "inputs": [...], "outputs": [...], "fingerprint"},
      "recipe": [{"technique": name, "params": {...}}, ...],      # replay to reproduce
      "lineage": [{"technique", "params", "decisions"}, ...],     # what each step decided
      "baseline": {"onnxruntime": Measurement, "torch": Measurement},
      "measurements": {"onnxruntime": Measurement, ...},          # of the written model
      "quality": Quality dict of the written model (vs baseline),
      ...command-specific keys
    }
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from compactai.measure.environment import environment
from compactai.models.handle import DEVICE_RUNTIMES, ModelHandle

MODEL_FILE = "model.onnx"
RESULTS_FILE = "results.json"


def save_model(handle: ModelHandle, out_dir: str | Path) -> Path:
    """Write ``handle`` as ``out_dir/model.onnx`` (exporting torch models, with parity); returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / MODEL_FILE
    if handle.framework == "torch":
        handle.to_onnx(target)
        return target
    assert handle.path is not None
    if handle.framework == "openvino":  # OpenVINO IR: model.xml + model.bin (the runtime that chose it runs it)
        return _copy_files(Path(handle.path), out / "model.xml", {".xml": ".xml", ".bin": ".bin"})
    if Path(handle.path).resolve() != target.resolve():
        tmp = target.with_suffix(".onnx.tmp")
        shutil.copyfile(handle.path, tmp)
        os.replace(tmp, target)
        data = Path(str(handle.path) + ".data")
        if data.exists():
            shutil.copyfile(data, out / (MODEL_FILE + ".data"))
    return target


def _copy_files(source: Path, target: Path, suffixes: dict[str, str]) -> Path:
    """Copy ``source`` and its sibling files with the other ``suffixes`` next to ``target``."""
    for old, new in suffixes.items():
        origin, destination = source.with_suffix(old), target.with_suffix(new)
        if origin.exists() and origin.resolve() != destination.resolve():
            tmp = destination.with_name(destination.name + ".tmp")
            shutil.copyfile(origin, tmp)
            os.replace(tmp, destination)
    return target


def model_file(handle: ModelHandle) -> str:
    """The name ``save_model`` gives this model's main file (model.onnx, model.xml for OpenVINO IR, or
    the converted file of a device runtime: model.tflite, model.pte)."""
    if handle.framework in DEVICE_RUNTIMES and handle.path is not None:
        return handle.path.name
    return "model.xml" if handle.framework == "openvino" else MODEL_FILE


def recipe_of(handle: ModelHandle) -> list[dict[str, Any]]:
    """The ordered technique steps (name + params) that produced ``handle``."""
    return [{"technique": step["technique"], "params": step["params"]} for step in handle.metadata.get("history", [])]


def describe(recipe: list[dict[str, Any]]) -> str:
    """A short human label: ``prune(ratio=0.5) -> quantize(mode=static)``."""
    if not recipe:
        return "(original)"
    parts = []
    for step in recipe:
        params = ", ".join(f"{k}={_short(v)}" for k, v in step["params"].items())
        parts.append(f"{step['technique']}({params})")
    return " -> ".join(parts)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "to_dict"):
        return to_jsonable(value.to_dict())
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


def write_results(out_dir: str | Path, command: str, handle: ModelHandle, *, seed: int = 0, **sections: Any) -> Path:
    """Write ``results.json`` atomically (temp file + rename) and return its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = handle.summary()
    summary["path"] = model_file(handle)
    data = {
        "command": command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": seed,
        "environment": environment(),
        "model": summary,
        "recipe": recipe_of(handle),
        "lineage": handle.metadata.get("history", []),
        **sections,
    }
    path = out / RESULTS_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(to_jsonable(data), indent=2))
    os.replace(tmp, path)
    return path
