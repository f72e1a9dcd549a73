"""int8 for the device runtimes (LiteRT ``.tflite``, ExecuTorch ``.pte``): the calibration rows
sent to the converter's worker, and the parity of the int8 file in its own runtime.

Calibration: the first ``CALIBRATION_ROWS`` rows of the task's calibration split (PT2E observers
need a few dozen real rows, not NNCF's 300), fitted to the shapes the file is converted for: with
an ``attention_mask`` the rows whose sentence fits the converted sequence length, padded to it.

Parity tolerances (docs/runtimes.md), on the same real rows as the fp32 check (the first 64 of
the task's evaluation split), the source in torch eager: per output, mean cosine of output rows
>= ``INT8_MIN_COSINE`` (as for OpenVINO's NNCF int8); for a classifier's logits (2-D outputs)
argmax agreement >= ``INT8_MIN_AGREEMENT``. Also reported: for token outputs with an attention
mask, the cosine of the mean-pooled sentence embeddings (min and mean: the embedding task's
metric, cosine_min, on these rows), else the task metric on its evaluation split (the digits CNN:
test accuracy); with ``min_quality`` that quality must reach the floor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from compactai.errors import BudgetNotMetError, InputSignatureError, ParameterError, ParityError
from compactai.measure.openvino import INT8_MIN_COSINE, parity_feeds, parity_figures, reference_outputs
from compactai.measure.runtime import make_runner
from compactai.models.handle import ModelHandle
from compactai.tasks import mean_pool, normalize

CALIBRATION_ROWS = 64
INT8_MIN_AGREEMENT = 0.95


def calibration_rows(handle: ModelHandle, task: Any, shapes: dict[str, tuple[int, ...]], fmt: str,
                     rows: int = CALIBRATION_ROWS) -> dict[str, np.ndarray]:
    """Up to ``rows`` rows of the task's calibration split with the per-row ``shapes`` of the
    converted file's inputs; ParameterError when there is no calibration data."""
    if task is None or "calibration" not in task.splits:
        raise ParameterError(
            f"--format {fmt} --quantize int8 calibrates on the task's calibration split and '{handle.name}' "
            "comes without one: pass --data TASK.npz (arrays 'calibration/<input>', 'validation/<input>', "
            "'test/<input>') or use --example NAME; from Python, give convert() a task.")
    inputs = task.split("calibration").inputs
    mask = inputs.get("attention_mask")
    if mask is not None and mask.ndim == 2 and "attention_mask" in shapes:
        length = shapes["attention_mask"][0]
        keep = np.flatnonzero(mask.sum(axis=1) <= length)[:rows]
        if not len(keep):
            raise InputSignatureError(
                f"No calibration row of '{handle.name}' fits the converted sequence length {length}; convert from "
                "longer evaluation rows or give calibration rows this short.")
        return {name: _fit(inputs[name][keep], shapes[name]) for name in handle.input_names}
    fitted = {name: inputs[name][:rows] for name in handle.input_names}
    for name, value in fitted.items():
        if tuple(value.shape[1:]) != tuple(shapes[name]):
            raise InputSignatureError(
                f"The calibration split's '{name}' has rows of shape {value.shape[1:]} and the {fmt} file is converted "
                f"for {tuple(shapes[name])}; give calibration rows of the evaluation rows' shape.")
    return fitted


def _fit(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Token rows cut or zero-padded on axis 1 to the converted length (zero: the pad id and a
    masked position; the rows kept never lose a token, see calibration_rows)."""
    if value.ndim != 2:
        return value
    length = shape[0]
    if value.shape[1] >= length:
        return np.ascontiguousarray(value[:, :length])
    return np.pad(value, ((0, 0), (0, length - value.shape[1])))


def check_int8(source: ModelHandle, converted: ModelHandle, task: Any, runtime: str, fmt: str,
               min_quality: float | None = None) -> dict[str, Any]:
    """Run the int8 ``converted`` in ``runtime`` next to ``source`` in torch on real rows; raises
    ParityError beyond the documented int8 tolerances (BudgetNotMetError below ``min_quality``);
    returns the figures."""
    feeds = parity_feeds(source, task)
    expected = reference_outputs(source, feeds)
    runner = make_runner(converted, runtime)
    try:
        got = runner.run(feeds)
        mask = feeds.get("attention_mask")
        report = parity_figures(expected, got, source.output_names, mask)
        report["samples"] = len(next(iter(feeds.values())))
        report["tolerance"] = {"min_mean_cosine": INT8_MIN_COSINE, "min_argmax_agreement": INT8_MIN_AGREEMENT}
        report["argmax_agreement"] = {name: float(np.mean(want.argmax(1) == have.argmax(1)))
                                      for name, want, have in zip(source.output_names, expected, got)
                                      if want.ndim == 2 and want.shape[1] > 1}
        if mask is not None and expected[0].ndim == 3:
            rows = (normalize(mean_pool(expected[0], mask)) * normalize(mean_pool(got[0], mask))).sum(axis=1)
            report["sentence_cosine"] = {"min": float(rows.min()), "mean": float(rows.mean())}
            # the embedding task's metric (cosine_min to the source) on these rows: its split is
            # trimmed per batch to other lengths than the one the file is converted for
            report["quality"] = {"metric": "cosine_min", "split": f"first {len(rows)} rows of the evaluation split",
                                 "value": float(rows.min()), "source": 1.0}
        elif task is not None:
            quality = task.evaluate(runner)
            report["quality"] = {"metric": quality.metric, "split": task.eval_split, "value": quality.value,
                                 "source": task.baseline}
    finally:
        getattr(runner, "close", lambda: None)()  # a worker process: stop it now, not at garbage collection
    cosine = min(report["mean_cosine"].values())
    agreement = min(report["argmax_agreement"].values(), default=1.0)
    report["ok"] = cosine >= INT8_MIN_COSINE and agreement >= INT8_MIN_AGREEMENT
    if not report["ok"]:
        raise ParityError(
            f"The int8 {runtime} model of '{source.name}' diverged from the source on {report['samples']} evaluation "
            f"rows: mean output cosine {cosine:.4f} (bar {INT8_MIN_COSINE}), argmax agreement {agreement:.3f} (bar "
            f"{INT8_MIN_AGREEMENT}). Export --format {fmt} in float (drop --quantize), or use --format openvino "
            "--quantize int8 --min-quality Q (NNCF keeps sensitive layers in float).")
    value = report.get("quality", {}).get("value")
    if min_quality is not None and value is not None and value < min_quality:
        raise BudgetNotMetError(
            f"The int8 {runtime} model of '{source.name}' reaches {value:.4f} on the {task.eval_split} split, below "
            f"--min-quality {min_quality:g}; export --format {fmt} in float or lower the floor.")
    return report
