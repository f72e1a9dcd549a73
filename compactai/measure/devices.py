"""The device runtimes, LiteRT (.tflite) and ExecuTorch (.pte), as registered plug-ins.

Their converters (litert-torch; torch.export + ExecuTorch's XNNPACK lowering) bring large
dependency trees (jax, torchao, coremltools, pandas, an older pydantic), and ExecuTorch's runtime
imports torch, so both live in their own venvs (``make runtime-venvs``: ``build/litert-venv``,
``build/executorch-venv``; or the venv's python named by $COMPACTAI_LITERT_PYTHON /
$COMPACTAI_EXECUTORCH_PYTHON). compactai drives them through ``_device_worker.py`` run by that
python: ``convert`` saves the torch model as a torch.export ``.pt2`` here and lowers it there
(bounded by $COMPACTAI_CONVERT_TIMEOUT seconds); a runner is a worker process that loads the
converted file and answers run/time requests over a pipe (timed inside the worker).

Shapes: a ``.tflite`` has static shapes (LiteRT's converter fixes them; the XNNPACK delegate
cannot resize it), so it is converted for one batch size (``batch``, default 1) and the runner
runs larger inputs in chunks of it. A ``.pte`` keeps a dynamic batch up to ``MAX_BATCH`` (torch.export
may narrow it: the digits CNN's comes out as 1..15; larger inputs run in chunks), or a static one
with ``batch``.
Other dimensions (e.g. MiniLM's sequence length) are fixed to those of the parity inputs.

int8 (``quantize="int8"``): the PT2E flow with each runtime's own quantizer, in the worker,
calibrated on the task's calibration split sent as arrays (``device_int8.py``: the rows and the
int8 parity tolerances).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from compactai.errors import (
    BadInputError,
    CorruptModelError,
    InputSignatureError,
    MissingDependencyError,
    TechniqueError,
    UnknownNameError,
    UnsupportedFormatError,
)
from compactai.measure import _device_worker as worker
from compactai.measure.device_int8 import calibration_rows, check_int8
from compactai.measure.openvino import check_converted, parity_feeds
from compactai.measure.runtime import Runner, RuntimePlugin, default_threads, register_runtime
from compactai.measure.stats import count_macs, parameter_count
from compactai.models.handle import DEVICE_SUFFIXES, ModelHandle, TensorSpec

MAX_BATCH = 64  # a .pte's batch upper bound (its memory is planned for it)
CONVERT_TIMEOUT = 1800.0  # seconds; MiniLM takes ~1 min (LiteRT) to a few (ExecuTorch) on 2 loaded cores
REQUEST_TIMEOUT = 600.0
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def _last_error(log: str) -> str:
    """The worker's one-line error, else the last non-empty line it printed (a crash)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    marked = [line[len(worker.ERROR_MARK):] for line in lines if line.startswith(worker.ERROR_MARK)]
    return (marked or lines or ["no output"])[-1][:600]


class _DevicePlugin(RuntimePlugin):
    in_auto = False
    env_var: ClassVar[str] = ""
    packages: ClassVar[str] = ""
    converter: ClassVar[str] = ""
    quantizer: ClassVar[str] = ""
    static_batch: ClassVar[bool] = False
    suffix: ClassVar[str] = ""

    @classmethod
    def venv_python(cls) -> Path | None:
        """The python of the runtime's venv: $COMPACTAI_<RUNTIME>_PYTHON, else build/<runtime>-venv
        in the compactai checkout or the current directory (where `make runtime-venvs` puts it)."""
        if os.environ.get(cls.env_var):
            return Path(os.environ[cls.env_var])
        for root in (PACKAGE_ROOT, Path.cwd()):
            candidate = root / "build" / f"{cls.name}-venv" / "bin" / "python"
            if candidate.is_file():
                return candidate
        return None

    @classmethod
    def install_line(cls) -> str:
        return (f"make runtime-venvs (or: python3 -m venv build/{cls.name}-venv && build/{cls.name}-venv/bin/pip "
                f"install -c constraints.txt {cls.packages}), or set {cls.env_var} to such a venv's python")

    @classmethod
    def available(cls) -> bool:
        python = cls.venv_python()
        return python is not None and python.is_file()

    @classmethod
    def require(cls) -> None:
        if not cls.available():
            where = f"{cls.env_var}={cls.venv_python()} does not exist" if os.environ.get(cls.env_var) \
                else f"no build/{cls.name}-venv was found"
            raise MissingDependencyError(
                f"The {cls.name} runtime runs in its own venv ({cls.packages} must not change compactai's "
                f"environment) and {where}. Create it with: {cls.install_line()}.")

    @classmethod
    def open(cls, handle: ModelHandle, threads: int | None = None) -> Runner:
        cls.require()
        if handle.framework != cls.name:
            raise UnsupportedFormatError(
                f"Model '{handle.name}' is a {handle.framework} model; {cls.name} runs .{cls.file_format} files. "
                f"Convert it first: compactai export MODEL --format {cls.file_format} -o OUT.")
        return DeviceRunner(cls, handle, threads)

    @classmethod
    def convert(cls, handle: ModelHandle, out_dir: Path, *, quantize: str | None = None,
                task: Any = None, min_quality: float | None = None, batch: int | None = None) -> ModelHandle:
        """``handle`` (a torch model) as a .tflite/.pte under ``out_dir``: torch.export here, the
        official converter in the runtime's venv, then parity against the source in that runtime."""
        cls.require()
        if quantize not in (None, "int8"):
            raise UnknownNameError(f"quantize must be 'int8' (or None for float); got {quantize!r}.")
        if handle.module is None:
            raise UnsupportedFormatError(
                f"The {cls.name} converter takes a torch model and '{handle.name}' is {handle.framework} "
                f"({handle.path}); give the torch model (a .pt2 file, a Hugging Face directory or --example).")
        out_dir.mkdir(parents=True, exist_ok=True)
        feeds = parity_feeds(handle, task)
        static = batch or (1 if cls.static_batch else None)  # None: a dynamic batch (ExecuTorch without --batch)
        rows = static or 2  # 2: an example batch of 1 would be specialized to 1
        sample = {name: np.repeat(value[:1], rows, axis=0) if len(value) < rows else value[:rows]
                  for name, value in feeds.items()}
        shapes = {name: tuple(sample[name].shape[1:]) for name in handle.input_names}
        calibration = None if quantize is None else calibration_rows(handle, task, shapes, cls.file_format)
        # transformers: dynamic activations (weights int8), as compactai's ONNX int8 does for them
        mode = "dynamic" if handle.kind == "transformer" else "static"
        out = out_dir / f"model.{cls.suffix}"
        with tempfile.TemporaryDirectory(prefix=f"compactai-{cls.name}-") as work:  # the .pt2: MiniLM's is 90 MB
            cls._lower(handle, sample, Path(work), out, dynamic=static is None, calibration=calibration, mode=mode)
        details: dict[str, Any] = {"converter": cls.converter, "python": str(cls.venv_python()), "precision": "fp32",
                                   "batch": static or f"1..{MAX_BATCH}",
                                   "input_shapes": {name: list(shape) for name, shape in shapes.items()}}
        if calibration is not None:
            details.update(precision="int8", quantizer=cls.quantizer, activations=mode,
                           calibration_rows=len(next(iter(calibration.values()))))
        converted = handle.derive(framework=cls.name, path=out, module=None,
                                  metadata={**handle.metadata, "runtime": cls.name, cls.name: details})
        converted.metadata.update(params=parameter_count(handle), macs=handle.metadata.get("macs") or count_macs(handle))
        converted.metadata["parity"] = check_converted(handle, converted, task, runtime=cls.name) if quantize is None \
            else check_int8(handle, converted, task, cls.name, cls.file_format, min_quality)
        return converted


    @classmethod
    def _lower(cls, handle: ModelHandle, sample: dict[str, np.ndarray], work: Path, out: Path, *,
               dynamic: bool, calibration: dict[str, np.ndarray] | None = None, mode: str = "static") -> None:
        """torch.export ``handle`` on ``sample`` here, then the official converter in the venv writes
        ``out`` (int8 when given ``calibration`` rows: the PT2E flow with the runtime's quantizer)."""
        import torch

        assert handle.module is not None  # convert() refused module-less handles
        args = tuple(torch.from_numpy(np.ascontiguousarray(sample[name])) for name in handle.input_names)
        shapes = None if not dynamic else tuple(
            {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)} for _ in args)
        try:
            program = torch.export.export(handle.module, args, dynamic_shapes=shapes, strict=False)
        except Exception as exc:  # torch.export raises many types (UserError, GuardOnDataDependent, ...)
            raise UnsupportedFormatError(f"torch.export cannot capture '{handle.name}' for {cls.name}: "
                                         f"{worker.one_line(exc)}") from exc
        torch.export.save(program, str(work / "program.pt2"))
        # the worker runs torch.export.load on this file: check it as any .pt2 (no pickled members)
        from compactai.models.pt2_archive import check_pt2_archive

        check_pt2_archive(work / "program.pt2")
        np.savez(work / "inputs.npz", allow_pickle=False,
                 **{f"{i:03d}_{name}": sample[name] for i, name in enumerate(handle.input_names)})
        log_path = out.parent / f"{cls.name}-convert.log"
        timeout = float(os.environ.get("COMPACTAI_CONVERT_TIMEOUT", CONVERT_TIMEOUT))
        command = [str(cls.venv_python()), worker.__file__, "convert", cls.name, str(work / "program.pt2"),
                   str(work / "inputs.npz"), str(out)]
        if calibration is not None:  # arrays, as the inputs: the worker unpickles nothing
            np.savez(work / "calibration.npz", allow_pickle=False,
                     **{f"{i:03d}_{name}": calibration[name] for i, name in enumerate(handle.input_names)})
            command += [str(work / "calibration.npz"), mode]
        try:
            done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise TechniqueError(f"The {cls.name} converter did not finish within {timeout:g} s; raise "
                                 "COMPACTAI_CONVERT_TIMEOUT (seconds) on a slow or loaded machine.") from exc
        log_path.write_text(done.stdout + done.stderr)
        if done.returncode != 0 or not out.is_file():
            raise UnsupportedFormatError(f"The {cls.name} converter ({cls.converter}) cannot lower '{handle.name}': "
                                         f"{_last_error(done.stderr)} (full log: {log_path})")


class DeviceRunner:
    """A worker process in the runtime's venv holding one converted model. ``run`` sends the
    inputs over a pipe; ``timed_samples`` times calls inside the worker, so a latency measured
    through it excludes the pipe."""

    def __init__(self, plugin: type[_DevicePlugin], handle: ModelHandle, threads: int | None = None) -> None:
        self.runtime = plugin.name
        self.handle = handle
        self.threads = threads or default_threads()
        # a .tflite always has one batch size; a .pte has one when converted with --batch
        self.static_batch = plugin.static_batch or isinstance(handle.metadata.get(plugin.name, {}).get("batch"), int)
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (lives as long as the worker; closed with it)
        self.process = subprocess.Popen(
            [str(plugin.venv_python()), worker.__file__, "serve", plugin.name, str(handle.path), str(self.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self._finalizer = weakref.finalize(self, _stop, self.process, self._log)
        reply = self._receive()
        self.shapes: list[list[int]] = reply["shapes"]
        self.max_batch = self.shapes[0][0] if self.shapes and self.shapes[0] else 1

    def _receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        frame = worker.read_frame(self.process.stdout)
        if frame is None:
            self._log.seek(0)
            raise CorruptModelError(f"{self.runtime} cannot run {self.handle.path}: {_last_error(self._log.read())}")
        self.reply_arrays = frame
        return dict(json.loads(bytes(frame.pop("__reply__")).decode()))

    def _call(self, request: dict[str, Any], arrays: list[np.ndarray]) -> dict[str, Any]:
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # the worker died: _receive reports its last error line
            worker.write_frame(self.process.stdin, {"__request__": worker.pack_json(request),
                                                    **{f"input_{i}": a for i, a in enumerate(arrays)}})
        return self._receive()

    def _arrays(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.handle.check_feeds(feeds)
        arrays = [np.asarray(feeds[name]) for name in self.handle.input_names]
        for name, array, shape in zip(self.handle.input_names, arrays, self.shapes):
            if list(array.shape[1:]) != shape[1:]:
                raise InputSignatureError(
                    f"The {self.runtime} model {self.handle.path} was converted for '{name}' of shape "
                    f"(batch, {', '.join(map(str, shape[1:]))}); got {array.shape}. Convert it from inputs of "
                    "this shape (the task's split, or --data).")
        return arrays

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = self._arrays(feeds)
        rows = len(arrays[0])
        chunks = []
        for start in range(0, rows, self.max_batch):
            part = [a[start:start + self.max_batch] for a in arrays]
            taken = len(part[0])
            if self.static_batch and taken < self.max_batch:  # a .tflite runs its one batch size: pad, then crop
                part = [np.concatenate([p, np.repeat(p[-1:], self.max_batch - taken, axis=0)]) for p in part]
            self._call({"command": "run"}, part)
            outputs = [self.reply_arrays[f"output_{i}"][:taken] for i in range(len(self.reply_arrays))]
            chunks.append(outputs)
        return [np.concatenate([chunk[i] for chunk in chunks]) for i in range(len(chunks[0]))]

    def timed_samples(self, feeds: dict[str, np.ndarray], *, warmup: int, queries: int, seconds: float,
                      max_seconds: float) -> tuple[list[float], float]:
        """Seconds per call of ``feeds`` run back to back inside the worker, and the worker's CPU seconds."""
        arrays = self._arrays(feeds)
        if len(arrays[0]) > self.max_batch or (self.static_batch and len(arrays[0]) != self.max_batch):
            raise InputSignatureError(
                f"The {self.runtime} model {self.handle.path} runs batches of {'' if self.static_batch else 'up to '}"
                f"{self.max_batch}; it cannot be timed at batch {len(arrays[0])}. Convert it for that batch.")
        self._call({"command": "time", "warmup": warmup, "queries": queries, "seconds": seconds,
                    "max_seconds": max_seconds}, arrays)
        return [float(x) for x in self.reply_arrays["samples"]], float(self.reply_arrays["cpu_seconds"])

    def thread_settings(self) -> dict[str, Any]:
        return {"threads": self.threads, "process": f"worker in {self.runtime}'s venv",
                "batch": self.max_batch if self.static_batch else f"1..{self.max_batch}"}

    def close(self) -> None:
        self._finalizer()


def _stop(process: subprocess.Popen, log: Any) -> None:
    log.close()
    if process.poll() is None:
        if process.stdin is not None:
            process.stdin.close()  # the worker's loop ends at end of input
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@register_runtime
class LiteRtPlugin(_DevicePlugin):
    """LiteRT (formerly TensorFlow Lite): litert-torch converts, ai-edge-litert's interpreter runs .tflite."""

    name = "litert"
    extra = "litert"
    file_format = "tflite"
    suffix = "tflite"
    formats = ("litert",)
    env_var = "COMPACTAI_LITERT_PYTHON"
    packages = "litert-torch ai-edge-litert"
    converter = "litert_torch.convert"
    quantizer = "litert_torch PT2EQuantizer (PT2E, symmetric per-channel int8) as quant_config"
    static_batch = True


@register_runtime
class ExecuTorchPlugin(_DevicePlugin):
    """ExecuTorch (PyTorch's on-device runtime): XNNPACK-lowered .pte programs run by its runtime."""

    name = "executorch"
    extra = "executorch"
    file_format = "pte"
    suffix = "pte"
    formats = ("executorch",)
    env_var = "COMPACTAI_EXECUTORCH_PYTHON"
    packages = "executorch torch==2.13.0"
    converter = "executorch to_edge_transform_and_lower(XnnpackPartitioner).to_executorch"
    quantizer = "XNNPACKQuantizer (PT2E, symmetric per-channel int8)"



def load_device_model(path: Path, model: dict[str, Any], conversion: dict[str, Any]) -> ModelHandle:
    """A converted ``.tflite`` / ``.pte`` as a handle for its runtime's runner. The file does not name
    its inputs the way compactai feeds them, so the signature comes from what ``compactai export``
    recorded beside it (results.json: ``model`` and ``conversion``), or from a bundle's manifest."""
    runtime = DEVICE_SUFFIXES.get(path.suffix.lower())
    if runtime is None:
        raise UnsupportedFormatError(f"{path.name} is not a .tflite or .pte file.")
    shapes = conversion.get("input_shapes") if isinstance(conversion, dict) else None
    specs = model.get("inputs") if isinstance(model, dict) else None
    if not isinstance(shapes, dict) or not isinstance(specs, list) or not specs \
            or any(not isinstance(s, dict) or s.get("name") not in shapes for s in specs):
        raise BadInputError(f"{path} comes without the record of its inputs (the results.json that compactai export "
                            f"writes beside it); pass the export's output directory, or re-export the model: "
                            f"compactai export MODEL --format {path.suffix.lstrip('.')} -o OUT.")
    batch = conversion.get("batch")
    first: int | str = batch if isinstance(batch, int) else "batch"
    inputs = [TensorSpec(s["name"], (first, *[int(d) for d in shapes[s["name"]]]), str(s["dtype"])) for s in specs]
    outputs = [TensorSpec.from_dict(s) for s in model.get("outputs") or []]
    from compactai.models.load import synthesize_inputs

    return ModelHandle(framework=runtime, name=str(model.get("name") or path.stem), inputs=inputs, outputs=outputs,
                       example_inputs=synthesize_inputs(inputs, batch=1), path=path,
                       kind=str(model.get("kind") or "generic"), metadata={"runtime": runtime, runtime: conversion})
