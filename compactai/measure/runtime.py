"""Runners: one way to execute a model on a runtime with explicit thread counts.

Each runtime is a plug-in (:class:`RuntimePlugin`) registered in ``RUNTIME_PLUGINS`` by name,
like techniques: it opens a session for a handle (converting it as its official tool requires),
converts a handle to its own file format, and reports its thread settings. ``onnxruntime`` and
``torch`` live here; ``openvino`` in ``measure/openvino.py``; ``litert`` and ``executorch`` in
``measure/devices.py``. A runtime whose optional extra is missing raises MissingDependencyError
with the exact pip line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from compactai._registry import Registry
from compactai.errors import (
    BadInputError,
    CorruptModelError,
    InputSignatureError,
    MissingDependencyError,
    UnknownNameError,
)
from compactai.models.handle import ModelHandle, set_eval

# the runtimes every install has (profile/prune "all"); plug-ins add to RUNTIME_PLUGINS
RUNTIMES = ("onnxruntime", "torch")


def default_threads() -> int:
    """Threads used when none are given: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Runner(Protocol):
    """Runs a model: feeds by input name -> one numpy array per output."""

    runtime: str
    threads: int

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class RuntimePlugin:
    """One runtime: how to open a session for a handle, convert a handle to the runtime's own
    format, and what its thread settings are. Subclasses set ``name``, ``modules`` (what must be
    importable), ``extra`` (the optional extra that installs them; None = always installed) and
    ``formats`` (the handle frameworks it runs without conversion)."""

    name: str = ""
    modules: tuple[str, ...] = ()
    extra: str | None = None
    formats: tuple[str, ...] = ("onnx",)
    file_format: str = "onnx"  # what `compactai export --format` calls its files
    # measured by `--runtime auto`: device runtimes (LiteRT, ExecuTorch) are not, since each
    # candidate would first need a minutes-long conversion in another venv (benchmarks/runtimes.py measures them)
    in_auto: bool = True

    @classmethod
    def install_line(cls) -> str:
        return f"pip install -c constraints.txt 'compactai[{cls.extra}]'" if cls.extra else ""

    @classmethod
    def available(cls) -> bool:
        """Whether the runtime's packages can be imported here (without importing them)."""
        import importlib.util

        return all(importlib.util.find_spec(module) is not None for module in cls.modules)

    @classmethod
    def require(cls) -> None:
        """MissingDependencyError with the pip line when the runtime is not installed."""
        if not cls.available():
            raise MissingDependencyError(
                f"The {cls.name} runtime needs {', '.join(cls.modules)}, which is not installed. "
                f"Install it with: {cls.install_line()}"
            )

    @classmethod
    def open(cls, handle: ModelHandle, threads: int | None = None) -> Runner:
        """A session for ``handle`` (converted in memory if it is not in this runtime's format)."""
        raise NotImplementedError

    @classmethod
    def convert(cls, handle: ModelHandle, out_dir: Path, *, quantize: str | None = None,
                task: Any = None, min_quality: float | None = None) -> ModelHandle:
        """``handle`` written in this runtime's format under ``out_dir`` (``quantize``: None or
        "int8"), checked for parity in this runtime against the source on real inputs."""
        raise UnknownNameError(f"The {cls.name} runtime has no converter of its own; use --format onnx.")

    @classmethod
    def model_size(cls, handle: ModelHandle) -> int | None:
        """Bytes on disk of the model as this runtime loads it (None when it has no file)."""
        from compactai.measure.stats import size_on_disk

        target = handle if handle.framework in cls.formats else handle.to_onnx()
        return size_on_disk(target.path) if target.path is not None else None


RUNTIME_PLUGINS: Registry[type[RuntimePlugin]] = Registry("runtime")


def register_runtime(plugin: type[RuntimePlugin]) -> type[RuntimePlugin]:
    """Class decorator: make ``plugin`` known by its ``name``."""
    return RUNTIME_PLUGINS.register(plugin.name, plugin)


def runtime_plugin(name: str) -> type[RuntimePlugin]:
    """The plug-in called ``name``; an unknown name lists the known ones."""
    return RUNTIME_PLUGINS.get(name)


def installed_runtimes() -> list[str]:
    """Registered runtimes (other than torch eager and the device runtimes) installed here: what
    `--runtime auto` measures."""
    return [name for name, plugin in RUNTIME_PLUGINS.items()
            if name != "torch" and plugin.in_auto and plugin.available()]


def thread_settings(runner: Runner) -> dict[str, Any]:
    """The runner's thread settings as plain data (intra-op threads and what else it reports)."""
    report = getattr(runner, "thread_settings", None)
    return report() if callable(report) else {"threads": runner.threads}


class OnnxRuntimeRunner:
    """ONNX Runtime CPU session with intra-op threads set explicitly and inter-op threads 1."""

    runtime = "onnxruntime"

    def __init__(self, handle: ModelHandle, threads: int | None = None, optimization: str = "all") -> None:
        import onnxruntime as ort

        onnx_handle = handle.to_onnx() if handle.framework != "onnx" else handle
        self.handle = onnx_handle
        self.threads = threads or default_threads()
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        levels = {
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }
        options.graph_optimization_level = levels[optimization]
        try:
            self.session = ort.InferenceSession(
                str(onnx_handle.path), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise CorruptModelError(
                f"ONNX Runtime cannot load {onnx_handle.path}: {str(exc).splitlines()[0][:300]}"
            ) from exc
        self._output_names = [o.name for o in self.session.get_outputs()]

    def thread_settings(self) -> dict[str, Any]:
        return {"intra_op_threads": self.threads, "inter_op_threads": 1}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        self.handle.check_feeds(feeds)
        try:
            return list(self.session.run(self._output_names, {n: feeds[n] for n in self.handle.input_names}))
        except Exception as exc:
            # ORT reports a failed allocation as a generic Fail; it means the model asks for more
            # memory than there is (a huge intermediate tensor), which is the model's problem, not ours
            if "Failed to allocate memory" in str(exc):
                raise BadInputError(
                    f"ONNX Runtime ran out of memory running {self.handle.path}: a tensor of the model is larger "
                    "than this machine can hold; check the model's shapes (and the batch of its inputs)."
                ) from None
            raise


class TorchRunner:
    """PyTorch eager on the CPU in inference mode, with torch's intra-op threads set."""

    runtime = "torch"

    def __init__(self, handle: ModelHandle, threads: int | None = None) -> None:
        import torch

        if handle.module is None:
            raise InputSignatureError(
                f"Model '{handle.name}' is an ONNX file and has no PyTorch module; use --runtime onnxruntime."
            )
        self.handle = handle
        self.threads = threads or default_threads()
        torch.set_num_threads(self.threads)
        set_eval(handle.module)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.handle.run_torch(feeds)

    def thread_settings(self) -> dict[str, Any]:
        return {"intra_op_threads": self.threads}


@register_runtime
class OnnxRuntimePlugin(RuntimePlugin):
    """ONNX Runtime on the CPU: compactai's default runtime."""

    name = "onnxruntime"
    modules = ("onnxruntime",)

    @classmethod
    def open(cls, handle: ModelHandle, threads: int | None = None) -> Runner:
        return OnnxRuntimeRunner(handle, threads=threads)

    @classmethod
    def convert(cls, handle: ModelHandle, out_dir: Path, *, quantize: str | None = None,
                task: Any = None, min_quality: float | None = None) -> ModelHandle:
        if quantize is not None:
            raise UnknownNameError("ONNX int8 comes from `compactai quantize`; export --format onnx writes float.")
        out_dir.mkdir(parents=True, exist_ok=True)
        return handle.to_onnx(out_dir / "model.onnx") if handle.framework == "torch" else handle


@register_runtime
class TorchPlugin(RuntimePlugin):
    """PyTorch eager: the reference a converted model is compared with."""

    name = "torch"
    modules = ("torch",)
    formats = ("torch",)

    @classmethod
    def open(cls, handle: ModelHandle, threads: int | None = None) -> Runner:
        return TorchRunner(handle, threads=threads)

    @classmethod
    def model_size(cls, handle: ModelHandle) -> int | None:
        return None


def make_runner(handle: ModelHandle, runtime: str = "onnxruntime", threads: int | None = None) -> Runner:
    """A runner for ``handle`` on ``runtime`` (any registered runtime: onnxruntime, torch, openvino, ...)."""
    if runtime not in RUNTIME_PLUGINS:
        raise UnknownNameError(f"Unknown runtime '{runtime}'; choose one of {', '.join(RUNTIME_PLUGINS.names())}.")
    plugin = RUNTIME_PLUGINS.get(runtime)
    plugin.require()
    return plugin.open(handle, threads)
