"""The OpenVINO runtime plug-in: run ONNX models and OpenVINO IR on the CPU, convert ONNX to IR
(``ov.convert_model``), and int8 through NNCF's post-training quantization (the accuracy-aware
variant when a quality floor is given).

Parity tolerances (docs/runtimes.md): fp32 IR against its source, max abs diff per output
<= ``FP32_TOLERANCE``; int8 against the float source, mean cosine of output rows >=
``INT8_MIN_COSINE`` (an int8 model is not expected to match element by element; the task's
quality floor, when given, is the real bar).
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from compactai.errors import BudgetNotMetError, CorruptModelError, ParityError
from compactai.measure.runtime import (
    Runner,
    RuntimePlugin,
    default_threads,
    make_runner,
    register_runtime,
)
from compactai.measure.stats import count_macs, parameter_count
from compactai.models.handle import ModelHandle, TensorSpec
from compactai.models.load import synthesize_inputs

FP32_TOLERANCE = 1e-3
INT8_MIN_COSINE = 0.99
CALIBRATION_ROWS = 300  # NNCF's default subset size
# The accuracy-aware quantizer's bounds. Uncapped, it ranks every quantized layer on the whole
# validation split and may revert them one by one: on MiniLM it ran over 25 minutes on 2 cores.
ACCURACY_AWARE_MAX_REVERTS = 12  # layers it may put back in float before it gives up
RANKING_CHUNKS = 16  # validation chunks of 8 rows each that rank the layers by their harm


class OpenVinoRunner:
    """An OpenVINO CPU compiled model with its threads set explicitly, one stream, the latency
    hint, and f32 inference precision: without the hint OpenVINO runs float layers in bf16 on CPUs
    that have it, which would make an "fp32" measurement a bf16 one. Quantized layers stay int8."""

    runtime = "openvino"

    def __init__(self, handle: ModelHandle, threads: int | None = None) -> None:
        import openvino as ov

        self.handle = handle
        self.threads = threads or default_threads()
        core = ov.Core()
        try:
            if handle.framework == "openvino":
                model = core.read_model(str(handle.path))
            else:  # ONNX (torch models are exported first, with ONNX parity checked)
                model = core.read_model(str(handle.to_onnx().path))
            self.config = runner_config(self.threads)
            self.compiled = core.compile_model(model, "CPU", self.config)
        except RuntimeError as exc:  # OpenVINO raises RuntimeError (or subclasses) for unreadable models
            raise CorruptModelError(f"OpenVINO cannot load {handle.path}: {converter_message(exc)}") from exc
        self.request = self.compiled.create_infer_request()
        self._inputs = handle.input_names
        self._outputs = list(self.compiled.outputs)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.handle.check_feeds(feeds)
        result = self.request.infer({name: feeds[name] for name in self._inputs})
        return [np.array(result[port]) for port in self._outputs]  # copies: the request reuses its buffers

    def thread_settings(self) -> dict[str, Any]:
        return {"inference_num_threads": self.threads, "num_streams": 1, "performance_hint": "LATENCY",
                "inference_precision": "f32"}


def runner_config(threads: int) -> dict[str, Any]:
    """The compile settings of compactai's OpenVINO runner (also used by the memory probe)."""
    return {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32"}


def converter_message(exc: BaseException, limit: int = 400) -> str:
    """The useful part of an OpenVINO error: its "Summary:" (the operators it could not convert)
    when there is one, else its first line that is not a source location."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if "Summary:" in lines:
        return " ".join(lines[lines.index("Summary:") + 1:])[:limit]
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '"))]
    return (useful or lines or [type(exc).__name__])[0][:limit]


@register_runtime
class OpenVinoPlugin(RuntimePlugin):
    """OpenVINO (extra ``openvino``): runs ONNX directly or its own IR (model.xml + model.bin)."""

    name = "openvino"
    modules = ("openvino", "nncf")
    extra = "openvino"
    formats = ("onnx", "openvino")
    file_format = "openvino"

    @classmethod
    def open(cls, handle: ModelHandle, threads: int | None = None) -> Runner:
        return OpenVinoRunner(handle, threads)

    @classmethod
    def convert(cls, handle: ModelHandle, out_dir: Path, *, quantize: str | None = None,
                task: Any = None, min_quality: float | None = None) -> ModelHandle:
        """``handle`` as OpenVINO IR in ``out_dir`` (model.xml + model.bin), fp32 or NNCF int8,
        with its parity against the source checked in OpenVINO on real inputs."""
        cls.require()
        import openvino as ov

        out_dir.mkdir(parents=True, exist_ok=True)
        onnx_handle = handle.to_onnx(Path(tempfile.mkdtemp(prefix="compactai-ov-")) / "source.onnx") \
            if handle.framework == "torch" else handle
        model = ov.convert_model(str(onnx_handle.path))
        details: dict[str, Any] = {"converter": f"openvino.convert_model {ov.__version__}", "precision": "fp32"}
        if quantize is not None:
            # NNCF draws progress bars on stdout, which must stay one JSON object under --json
            with contextlib.redirect_stdout(sys.stderr):
                model, details = _nncf_int8(model, handle, onnx_handle, task, min_quality)
        xml = out_dir / "model.xml"
        # compress_to_fp16=False: an fp32 IR keeps fp32 weights (the default halves them to fp16)
        ov.save_model(model, str(xml), compress_to_fp16=False)
        converted = handle.derive(framework="openvino", path=xml, module=None,
                                  metadata={**handle.metadata, "runtime": "openvino", "openvino": details})
        converted.metadata.update(params=parameter_count(handle if handle.module is not None else onnx_handle),
                                  macs=handle.metadata.get("macs") or count_macs(handle))
        converted.metadata["parity"] = check_converted(handle, converted, task, int8=quantize is not None)
        return converted


def load_openvino(path: str | Path, name: str | None = None) -> ModelHandle:
    """A handle for an OpenVINO IR file (model.xml next to its model.bin): its signature read from
    the IR (dynamic dimensions named), example inputs synthesized from it."""
    import openvino as ov

    path = Path(path)
    weights = path.with_suffix(".bin")
    if path.suffix != ".xml" or not path.is_file() or not weights.is_file():
        raise CorruptModelError(f"{path} is not an OpenVINO IR: it needs {path.name} and {weights.name} side by side.")
    try:
        model = ov.Core().read_model(str(path))
    except RuntimeError as exc:
        raise CorruptModelError(f"OpenVINO cannot read {path}: {converter_message(exc)}") from exc

    def specs(ports: Any, prefix: str) -> list[TensorSpec]:
        out = []
        for index, port in enumerate(ports):
            names = sorted(port.get_names())
            shape = tuple(d.get_length() if d.is_static else ("batch" if i == 0 else f"{prefix}{index}_{i}")
                          for i, d in enumerate(port.get_partial_shape()))
            out.append(TensorSpec(names[0] if names else f"{prefix}{index}", shape, port.get_element_type().to_dtype().name))
        return out

    inputs = specs(model.inputs, "input")
    return ModelHandle(framework="openvino", name=name or path.stem, inputs=inputs, outputs=specs(model.outputs, "output"),
                       example_inputs=synthesize_inputs(inputs, batch=1, seed=0), path=path,
                       metadata={"runtime": "openvino"})


def parity_feeds(handle: ModelHandle, task: Any, rows: int = 64) -> dict[str, np.ndarray]:
    """Real inputs for a parity check: the task's evaluation split (first ``rows``), else the
    handle's example inputs."""
    if task is None:
        return handle.example_inputs
    split = task.split(task.eval_split).take(rows)
    return next(split.batches(rows))[0]


def reference_outputs(source: ModelHandle, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The source model's outputs in its own runtime (torch eager, or ONNX Runtime)."""
    return source.run_torch(feeds) if source.module is not None else make_runner(source, "onnxruntime").run(feeds)


def check_converted(source: ModelHandle, converted: ModelHandle, task: Any = None, *, int8: bool = False,
                    runtime: str = "openvino") -> dict[str, Any]:
    """Run ``converted`` in ``runtime`` and ``source`` in its own on the same real inputs;
    raises ParityError beyond the documented tolerance; returns the figures."""
    feeds = parity_feeds(source, task)
    expected = reference_outputs(source, feeds)
    got = make_runner(converted, runtime).run(feeds)
    report = parity_figures(expected, got, source.output_names, feeds.get("attention_mask"))
    report["samples"] = len(next(iter(feeds.values())))
    if int8:
        report["tolerance"] = {"min_mean_cosine": INT8_MIN_COSINE}
        worst = min(report["mean_cosine"].values())
        report["ok"] = worst >= INT8_MIN_COSINE
        if not report["ok"]:
            raise ParityError(f"The int8 {runtime} model of '{source.name}' diverged: mean cosine of its outputs "
                              f"to the source's is {worst:.4f} < {INT8_MIN_COSINE}. Keep it in float, or give "
                              "a quality floor (--min-quality) so the accuracy-aware quantizer keeps layers in float.")
    else:
        report["tolerance"] = {"max_abs_diff": FP32_TOLERANCE}
        worst = max(report["max_abs_diff"].values())
        report["ok"] = worst <= FP32_TOLERANCE
        if not report["ok"]:
            raise ParityError(f"The {runtime} model of '{source.name}' diverged from the source: max abs diff "
                              f"{worst:.3g} > {FP32_TOLERANCE:g}. Report the model; keep it on ONNX Runtime.")
    return report


def parity_figures(expected: list[np.ndarray], got: list[np.ndarray], names: list[str],
                   mask: np.ndarray | None = None) -> dict[str, Any]:
    """Per output: max abs diff and the mean cosine between rows (flattened per sample). With an
    attention ``mask``, padded positions of (batch, seq, ...) outputs are zeroed first: they are
    never read, and an int8 model need not reproduce them (MiniLM's differ wildly)."""
    diffs, cosines = {}, {}
    for name, want, have in zip(names, expected, got):
        if want.shape != have.shape:
            raise ParityError(f"Output '{name}' has shape {have.shape} after conversion but {want.shape} in the "
                              "source; the converter changed the model's signature.")
        if mask is not None and want.ndim >= 3 and want.shape[:2] == mask.shape:
            keep = mask.reshape(*mask.shape, *([1] * (want.ndim - 2))).astype(want.dtype)
            want, have = want * keep, have * keep
        a = want.reshape(len(want), -1).astype(np.float64)
        b = have.reshape(len(have), -1).astype(np.float64)
        diffs[name] = float(np.max(np.abs(a - b))) if a.size else 0.0
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosines[name] = float(np.mean((a * b).sum(axis=1) / np.maximum(norms, 1e-12))) if a.size else 1.0
    return {"max_abs_diff": diffs, "mean_cosine": cosines}


def _calibration_items(handle: ModelHandle, task: Any) -> list[dict[str, np.ndarray]]:
    """Calibration inputs one row each (NNCF's items): the task's calibration split, else the examples."""
    inputs = task.split("calibration").inputs if task is not None and "calibration" in task.splits \
        else handle.example_inputs
    count = min(CALIBRATION_ROWS, len(next(iter(inputs.values()))))
    return [{name: value[i:i + 1] for name, value in inputs.items()} for i in range(count)]


def _nncf_int8(model: Any, handle: ModelHandle, onnx_handle: ModelHandle, task: Any,
               min_quality: float | None) -> tuple[Any, dict[str, Any]]:
    """NNCF post-training int8 of an OpenVINO model. With a task and ``min_quality``, plain PTQ is
    tried first and, if it misses the floor on the validation split, NNCF's accuracy-aware
    variant keeps the most sensitive layers in float until the floor holds."""
    import nncf

    items = _calibration_items(handle, task)
    names = onnx_handle.input_names
    calibration = nncf.Dataset(items, lambda item: {n: item[n] for n in names})
    model_type = nncf.ModelType.TRANSFORMER if handle.kind == "transformer" else None
    details: dict[str, Any] = {"precision": "int8", "quantizer": f"nncf.quantize {nncf.__version__}",
                               "calibration_rows": len(items), "model_type": "transformer" if model_type else "default"}
    quantized = nncf.quantize(model, calibration, model_type=model_type, subset_size=len(items))
    if task is None or min_quality is None:
        return quantized, details
    quality = _validation_quality(quantized, handle, task)
    details["validation_quality_ptq"] = quality
    if quality >= min_quality:
        return quantized, details
    validation = task.split("validation")
    chunks = [validation.take(slice(i, i + 8)) for i in range(0, len(validation), 8)]  # kept alive: metric caches by id

    def validate(compiled: Any, data: Any) -> tuple[float, list[float]]:
        predict = _compiled_predict(compiled, names)
        subset = list(data)
        values = [task.metric.score(predict, chunk, 8)[0] for chunk in subset]
        whole = task.metric.score(predict, validation, task.batch_size)[0] if len(subset) == len(chunks) else min(values)
        return whole, values

    baseline = task.evaluate(make_runner(onnx_handle, "onnxruntime"), "validation").value
    details["quantizer"] = f"nncf.quantize_with_accuracy_control {nncf.__version__}"
    details["max_drop"] = max(baseline - min_quality, 0.0)
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    bounds = AdvancedAccuracyRestorerParameters(max_num_iterations=ACCURACY_AWARE_MAX_REVERTS,
                                                ranking_subset_size=min(RANKING_CHUNKS, len(chunks)))
    details.update(max_reverts=bounds.max_num_iterations, ranking_rows=8 * bounds.ranking_subset_size)
    quantized = nncf.quantize_with_accuracy_control(
        model, calibration, nncf.Dataset(chunks), validate, max_drop=details["max_drop"],
        drop_type=nncf.DropType.ABSOLUTE, model_type=model_type, subset_size=len(items),
        advanced_accuracy_restorer_parameters=bounds)
    details["validation_quality"] = _validation_quality(quantized, handle, task)
    if details["validation_quality"] < min_quality:
        raise BudgetNotMetError(
            f"NNCF's accuracy-aware int8 of '{handle.name}' reaches {details['validation_quality']:.4f} on the "
            f"validation split after putting up to {ACCURACY_AWARE_MAX_REVERTS} layers back in float, below "
            f"--min-quality {min_quality:g}; keep the float model or lower the floor.")
    return quantized, details


def _compiled_predict(compiled: Any, names: list[str]) -> Any:
    outputs = list(compiled.outputs)

    def predict(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = compiled({n: feeds[n] for n in names})
        return [np.array(result[port]) for port in outputs]

    return predict


def _validation_quality(model: Any, handle: ModelHandle, task: Any) -> float:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return float(task.evaluate(_compiled_predict(compiled, handle.input_names), "validation").value)
