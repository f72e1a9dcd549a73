"""The drift profile as one self-contained JSON file: the server reads it with json.loads and
nothing else. State arrays are little-endian float32 in base64 (exact, a quarter of the size of
decimal lists, no pickle); every state array is float32 from the start, so the calibrated
thresholds hold for the stored values."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np

from compactai.errors import BadInputError

FORMAT = "compactai-drift-profile/1"
PROFILE_FILE = "drift_profile.json"


def encode_array(array: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype="<f4")
    return {"dtype": "float32", "shape": list(data.shape), "base64": base64.b64encode(data.tobytes()).decode("ascii")}


def decode_array(encoded: dict[str, Any]) -> np.ndarray:
    if encoded.get("dtype") != "float32" or not isinstance(encoded.get("base64"), str):
        raise BadInputError(f"A drift profile array is not base64 float32 ({sorted(encoded)}); rebuild the profile.")
    data = np.frombuffer(base64.b64decode(encoded["base64"]), dtype="<f4")
    return data.reshape(encoded["shape"]).astype(np.float64)


def to_json(value: Any) -> Any:
    """The profile as plain JSON data: arrays encoded (see above), numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return encode_array(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def with_arrays(profile: dict[str, Any]) -> dict[str, Any]:
    """The profile with its state arrays decoded (done once, not per window)."""
    if profile.get("format") != FORMAT:
        raise BadInputError(f"Not a {FORMAT} drift profile (format {profile.get('format')!r}); rebuild it with "
                            "this version of compactai.")

    def decoded(value: Any) -> Any:
        return decode_array(value) if isinstance(value, dict) and "base64" in value else value

    tests = [{**spec, "state": {k: decoded(v) for k, v in spec["state"].items()}} for spec in profile["tests"]]
    return {**profile, "tests": tests}


def save_profile(profile: dict[str, Any], directory: str | Path) -> Path:
    """Write the profile as ``directory/drift_profile.json``; returns its path."""
    path = Path(directory) / PROFILE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(profile)))
    return path


def load_profile(path: str | Path) -> dict[str, Any]:
    """A profile file (or the directory holding drift_profile.json), arrays decoded."""
    path = Path(path)
    if path.is_dir():
        path = path / PROFILE_FILE
    try:
        profile = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInputError(f"Cannot read the drift profile {path}: {exc}.") from exc
    if not isinstance(profile, dict):
        raise BadInputError(f"{path} is not a drift profile (a JSON object).")
    return with_arrays(profile)
