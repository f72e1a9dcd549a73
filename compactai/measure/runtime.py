"""Runners: one way to execute a model on a runtime with explicit thread counts."""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from compactai.errors import BadInputError, CorruptModelError, InputSignatureError, UnknownNameError
from compactai.models.handle import ModelHandle, set_eval

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


def make_runner(handle: ModelHandle, runtime: str = "onnxruntime", threads: int | None = None) -> Runner:
    """A runner for ``handle`` on ``runtime`` ("onnxruntime" or "torch")."""
    if runtime == "onnxruntime":
        return OnnxRuntimeRunner(handle, threads=threads)
    if runtime == "torch":
        return TorchRunner(handle, threads=threads)
    raise UnknownNameError(f"Unknown runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}.")
