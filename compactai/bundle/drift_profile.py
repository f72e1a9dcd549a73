"""The drift profile a bundle carries: the model run on held-out task data at bundle time, its
reference profile written as ``drift_profile.json`` and signed with the
rest of the bundle. The statistics live in compactai.measure.drift; the server's monitor in
compactai.runtime.drift reads the files back.

Reference data, in this order: ``--data FILE.npz`` (the '<split>/<input>' format the other
commands take), ``--example NAME``, or the example a compactai output directory was made from
(``results.json`` -> ``source.example``). The calibration and validation splits are the reference:
the test split stays unseen, and the training split is what the model has memorised.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from compactai.errors import BadInputError, ModelNotFoundError
from compactai.measure.drift import build_profile, save_profile
from compactai.models.handle import DEVICE_SUFFIXES

REFERENCE_SPLITS = ("calibration", "validation")


def reference_from_npz(path: str | Path, input_names: list[str]) -> tuple[dict[str, np.ndarray], str]:
    """(reference inputs, model kind) from an .npz of '<split>/<input>' arrays. Labels mean a classifier;
    without labels the task is embedding fidelity (as in ``compactai quantize --data``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"Data file {path} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except ValueError as exc:
        raise BadInputError(f"Cannot read {path} as a numpy .npz without pickle: {exc}") from exc
    splits = [s for s in REFERENCE_SPLITS if all(f"{s}/{n}" in arrays for n in input_names)]
    if not splits:
        raise BadInputError(f"{path} has no calibration or validation split for inputs {input_names}; store arrays "
                            "named '<split>/<input>' (e.g. 'validation/image').")
    inputs = {n: np.concatenate([arrays[f"{s}/{n}"] for s in splits]) for n in input_names}
    kind = "classifier" if any(f"{s}/labels" in arrays for s in splits) else "embedding"
    return inputs, kind


def reference_from_example(example: Any) -> tuple[dict[str, np.ndarray], str]:
    """(reference inputs, model kind) from a loaded built-in example's calibration and validation
    splits (``compactai.load_example(name)``: examples sit above bundle, so they are passed in)."""
    from compactai.tasks import EmbeddingFidelity

    splits = [example.task.splits[s] for s in REFERENCE_SPLITS if s in example.task.splits]
    inputs = {n: _concatenate_padded([s.inputs[n] for s in splits]) for n in splits[0].inputs}
    kind = "embedding" if isinstance(example.task.metric, EmbeddingFidelity) else "classifier"
    return inputs, kind


def _concatenate_padded(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate along samples, zero-padding the sequence axis when token splits differ in length."""
    width = max(p.shape[1] for p in parts) if parts[0].ndim == 2 else None
    if width is None or all(p.shape[1] == width for p in parts):
        return np.concatenate(parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts])


def example_of(results: dict[str, Any] | None) -> str | None:
    """The built-in example a compactai output directory was made from, if any."""
    source = (results or {}).get("source") or {}
    return source.get("example") if isinstance(source, dict) else None


def model_outputs(model: Path, inputs: dict[str, np.ndarray], batch_size: int = 64) -> list[np.ndarray]:
    """The model's outputs on the reference inputs, run in ONNX Runtime (or OpenVINO, for an IR) as
    the server will run it."""
    from compactai.measure import make_runner
    from compactai.tasks import trim_padding

    handle = _load(model)
    runner = make_runner(handle, "openvino" if handle.framework == "openvino" else "onnxruntime", threads=None)
    names = handle.input_names
    missing = sorted(set(names) - set(inputs))
    if missing:
        raise BadInputError(f"The drift reference data lacks the model's input(s) {missing}; it has {sorted(inputs)}.")
    total = len(inputs[names[0]])
    chunks: list[list[np.ndarray]] = []
    for start in range(0, total, batch_size):
        feeds = trim_padding({n: inputs[n][start : start + batch_size] for n in names})
        chunks.append(runner.run(feeds))
    return [_pad_tokens([c[i] for c in chunks]) for i in range(len(chunks[0]))]


def _pad_tokens(parts: list[np.ndarray]) -> np.ndarray:
    """Outputs of trimmed batches: token axes (rank 3) padded with zeros to the longest batch."""
    if parts[0].ndim != 3:
        return np.concatenate(parts)
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in parts])


def write_drift_profile(
    model: str | Path,
    inputs: dict[str, np.ndarray],
    kind: str | None,
    out_dir: str | Path,
    *,
    window: int = 200,
    alpha: float = 0.01,
    seed: int = 0,
) -> dict[str, Path]:
    """Compute the profile of ``model`` on reference ``inputs`` and write its files into ``out_dir``;
    returns {name in the bundle: path}, ready for ``build_bundle(..., extra_files=...)``."""
    outputs = model_outputs(Path(model), inputs)
    profile = build_profile(inputs, outputs, kind=kind, window=window, alpha=alpha, seed=seed)
    path = save_profile(profile, out_dir)
    return {path.name: path}


def _load(model: Path) -> Any:
    from compactai.measure.openvino import load_openvino
    from compactai.models.load import load_onnx

    return load_openvino(model) if model.suffix == ".xml" else load_onnx(model)


def drift_profile_files(
    model: str | Path,
    results: dict[str, Any] | None,
    out_dir: str | Path,
    *,
    data: str | Path | None = None,
    example: str | None = None,
    kind: str | None = None,
    window: int = 200,
    alpha: float = 0.01,
    seed: int = 0,
    example_loader: Callable[[str], Any] | None = None,
) -> tuple[dict[str, Path], str]:
    """The profile files for a bundle and where the reference came from; ({}, why not) when there is
    no reference data (the bundle is then served without drift detection). ``example_loader``
    (e.g. ``compactai.load_example``) loads a named example's data."""
    if data is not None and example is not None:
        raise BadInputError("Give the drift reference as --data FILE.npz or --example NAME, not both.")
    if Path(model).suffix.lower() in DEVICE_SUFFIXES:
        return {}, ("none: a .tflite/.pte model runs on its device, and drift is detected by compactai serve, "
                    "which serves ONNX and OpenVINO models")
    example = example or (example_of(results) if data is None else None)
    if data is not None:
        inputs, inferred = reference_from_npz(data, _load(Path(model)).input_names)
        origin = f"{Path(data).name} ({' + '.join(REFERENCE_SPLITS)} splits)"
    elif example is not None:
        if example_loader is None:
            raise BadInputError(f"The drift reference is the example {example!r}; pass example_loader="
                                "compactai.load_example (or --data FILE.npz) to load its data.")
        inputs, inferred = reference_from_example(example_loader(example))
        origin = f"example {example} ({' + '.join(REFERENCE_SPLITS)} splits)"
    else:
        return {}, "no reference data: pass --data FILE.npz or --example NAME to add a drift profile"
    files = write_drift_profile(model, inputs, kind or inferred, out_dir, window=window, alpha=alpha, seed=seed)
    return files, origin
