"""torch -> ONNX export with dynamic batch/sequence axes, then a parity check on real inputs."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compactai.errors import ParityError, TechniqueError
from compactai.models.handle import ModelHandle, set_eval, use_onnx_exporter

log = logging.getLogger(__name__)

OPSET = 17


@dataclass
class ParityReport:
    """Per-output max abs diff between two runs of the same inputs, and the tolerance used."""

    max_abs_diff: dict[str, float]
    tolerance: float
    metric_diff: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(d <= self.tolerance for d in self.max_abs_diff.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "metric_diff": self.metric_diff,
            "ok": self.ok,
            **self.details,
        }


def _dynamic_axes(handle: ModelHandle) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for spec in handle.inputs + handle.outputs:
        named = {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
        if named:
            axes[spec.name] = named
    return axes


@contextlib.contextmanager
def export_friendly_attention(module: Any) -> Iterator[None]:
    """Export Hugging Face attention in its plain ("eager") form.

    transformers defaults to SDPA attention, which exports as a graph ONNX Runtime's transformer
    optimizer cannot fuse into its Attention op (so its quantized form loses the fused QAttention
    kernel). The eager form computes the same function; the torch model keeps its own setting
    after the export.
    """
    switched: list[tuple[Any, str]] = []
    for sub in module.modules() if hasattr(module, "modules") else ():
        config = getattr(sub, "config", None)
        current = getattr(config, "_attn_implementation", None)
        if current in ("sdpa", "flash_attention_2", "flex_attention") and hasattr(sub, "set_attn_implementation"):
            try:
                sub.set_attn_implementation("eager")
            except Exception:  # an architecture without an eager path keeps what it has
                log.debug("cannot switch %s to eager attention", type(sub).__name__, exc_info=True)
                continue
            switched.append((sub, current))
    try:
        yield
    finally:
        for sub, previous in switched:
            sub.set_attn_implementation(previous)


def attention_shape(module: Any) -> dict[str, int]:
    """Heads and hidden width of a Hugging Face encoder (ORT's attention fusion needs them);
    empty when the layers disagree (e.g. after head pruning), so no fusion is attempted."""
    if not hasattr(module, "modules"):
        return {}
    hidden = None
    for sub in module.modules():
        value = getattr(getattr(sub, "config", None), "hidden_size", None)
        if isinstance(value, int):
            hidden = value
            break
    shapes = {
        (sub.num_attention_heads, sub.all_head_size)
        for sub in module.modules()
        if isinstance(getattr(sub, "num_attention_heads", None), int) and isinstance(getattr(sub, "all_head_size", None), int)
    }
    if hidden is None or len(shapes) != 1:
        return {}
    heads, width = shapes.pop()
    if heads <= 0 or width != hidden:
        return {}
    return {"attention_heads": heads, "hidden_size": hidden}


def export_onnx(
    handle: ModelHandle,
    path: str | Path,
    *,
    check_parity: bool = True,
    tolerance: float = 1e-3,
    parity_inputs: dict[str, np.ndarray] | None = None,
) -> ModelHandle:
    """Export a torch handle to ``path`` (single file, opset 17) and return the ONNX handle.

    Uses the TorchScript-based exporter (fast, one file, well supported by ONNX Runtime's
    quantization tools) and falls back to the torch.export-based one. With ``check_parity``
    the exported model is run on ``parity_inputs`` (default: the example inputs) and
    compared with torch; a divergence raises ParityError naming the output.
    """
    import torch

    if handle.module is None:
        raise TechniqueError(f"Model '{handle.name}' has no torch module to export.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module = handle.module
    set_eval(module)
    args = tuple(torch.from_numpy(np.ascontiguousarray(handle.example_inputs[n])) for n in handle.input_names)
    common: dict[str, Any] = {"input_names": handle.input_names, "output_names": handle.output_names, "opset_version": OPSET}
    errors: list[str] = []
    for dynamo in (False, True):
        try:
            with warnings.catch_warnings(), export_friendly_attention(module):
                warnings.simplefilter("ignore")
                if dynamo:
                    _export_dynamo(module, args, path, handle)
                else:
                    torch.onnx.export(
                        module, args, str(path), dynamo=False, dynamic_axes=_dynamic_axes(handle), **common
                    )
            break
        except Exception as exc:  # the exporters raise many types; keep the message for the report
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(exc).__name__}: {exc}")
            log.debug("ONNX export failed", exc_info=True)
    else:
        raise TechniqueError(
            f"Could not export '{handle.name}' to ONNX. " + " | ".join(e.splitlines()[0][:300] for e in errors)
        )
    import onnx

    onnx.checker.check_model(str(path))
    onnx_handle = ModelHandle(
        framework="onnx",
        name=handle.name,
        inputs=list(handle.inputs),
        outputs=list(handle.outputs),
        example_inputs=dict(handle.example_inputs),
        path=path,
        kind=handle.kind,
        metadata={**handle.metadata, "exported_from": "torch", **attention_shape(module)},
    )
    if check_parity:
        feeds = parity_inputs or handle.example_inputs
        report = compare_outputs(handle.run_torch(feeds), run_onnx(onnx_handle, feeds), handle.output_names, tolerance)
        onnx_handle.metadata["parity"] = report.to_dict()
        raise_if_diverged(report, handle.name)
    return onnx_handle


def _export_dynamo(module: Any, args: tuple, path: Path, handle: ModelHandle) -> None:
    import torch

    dims: dict[str, Any] = {}
    shapes = []
    for spec in handle.inputs:
        axes = {i: dims.setdefault(d, torch.export.Dim(d)) for i, d in enumerate(spec.shape) if isinstance(d, str)}
        shapes.append(axes or None)
    torch.onnx.export(
        module,
        args,
        str(path),
        dynamo=True,
        external_data=False,
        input_names=handle.input_names,
        output_names=handle.output_names,
        dynamic_shapes=tuple(shapes),
    )


def run_onnx(handle: ModelHandle, feeds: dict[str, np.ndarray], threads: int | None = None) -> list[np.ndarray]:
    """Run an ONNX handle once in ONNX Runtime (CPU)."""
    from compactai.measure.runtime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(handle, threads=threads).run(feeds)


def compare_outputs(
    reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str], tolerance: float
) -> ParityReport:
    """Max abs diff per output name between two lists of arrays."""
    diffs: dict[str, float] = {}
    for name, ref, cand in zip(names, reference, candidate):
        if ref.shape != cand.shape:
            diffs[name] = float("inf")
        else:
            diffs[name] = float(np.max(np.abs(ref.astype(np.float64) - cand.astype(np.float64)))) if ref.size else 0.0
    return ParityReport(max_abs_diff=diffs, tolerance=tolerance)


def raise_if_diverged(report: ParityReport, model_name: str) -> None:
    """ParityError naming the first output whose diff exceeds the tolerance."""
    for name, diff in report.max_abs_diff.items():
        if diff > report.tolerance:
            raise ParityError(
                f"ONNX export of '{model_name}' diverged: output '{name}' differs from torch by "
                f"max abs {diff:.3g} (tolerance {report.tolerance:g}). Check for ops that behave "
                "differently in eval mode or pass a larger tolerance."
            )


def check_parity(
    reference: ModelHandle,
    candidate: ModelHandle,
    feeds: dict[str, np.ndarray],
    *,
    tolerance: float = 1e-3,
    task: Any = None,
) -> ParityReport:
    """Compare two handles (torch or ONNX) on the same real inputs; with a task, also the metric diff."""
    ref_out = reference.run_torch(feeds) if reference.framework == "torch" else run_onnx(reference, feeds)
    cand_out = candidate.run_torch(feeds) if candidate.framework == "torch" else run_onnx(candidate, feeds)
    report = compare_outputs(ref_out, cand_out, reference.output_names, tolerance)
    if task is not None:
        from compactai.measure.runtime import make_runner

        ref_q = task.evaluate(make_runner(reference, "torch" if reference.framework == "torch" else "onnxruntime"))
        cand_q = task.evaluate(make_runner(candidate, "torch" if candidate.framework == "torch" else "onnxruntime"))
        report.metric_diff = cand_q.value - ref_q.value
        report.details["metric"] = ref_q.metric
    return report


def _export_for_handle(handle: ModelHandle, path: Path, parity: bool) -> ModelHandle:
    return export_onnx(handle, path, check_parity=parity)


use_onnx_exporter(_export_for_handle)  # ModelHandle.to_onnx converts through this (docs/architecture.md)
