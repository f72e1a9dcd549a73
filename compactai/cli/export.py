"""`compactai export`: write a model in a runtime's own format (ONNX, OpenVINO IR, .tflite, .pte)
with its official converter, checked for parity in that runtime against the source."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from compactai.cli._common import (
    EXAMPLE_OPTION,
    HF_TASK_OPTION,
    JSON_OPTION,
    Output,
    app,
    check_output_dir,
    resolve_model,
    table,
    task_from_data,
)
from compactai.errors import ParameterError, UnknownNameError

# --format -> the runtime that runs it
FORMATS = {"onnx": "onnxruntime", "openvino": "openvino", "tflite": "litert", "pte": "executorch"}


@app.command()
def export(
    path: str | None = typer.Argument(None, help="Model: .onnx, .pt2 or Hugging Face directory; or --example."),
    example: str | None = EXAMPLE_OPTION,
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx, openvino (IR: model.xml + model.bin), tflite "
                            "(LiteRT) or pte (ExecuTorch)."),
    quantize: str | None = typer.Option(None, "--quantize", "-q", help="int8: the runtime's own post-training "
                                        "int8 (OpenVINO: NNCF; tflite: litert-torch's PT2E quantizer; pte: "
                                        "XNNPACKQuantizer), calibrated on the task's calibration split (--example "
                                        "or --data)."),
    min_quality: float | None = typer.Option(None, "--min-quality", help="With --quantize: quality floor; OpenVINO "
                                             "then uses NNCF's accuracy-aware int8 (validation split); tflite/pte: "
                                             "the int8 file's quality in its runtime must reach it (exit 3)."),
    data: Path | None = typer.Option(None, "--data", help="Task data for PATH (.npz as for quantize): "
                                     "calibration and parity inputs."),
    hf_task: str | None = HF_TASK_OPTION,
    batch: int | None = typer.Option(None, "--batch", min=1, help="tflite/pte: the static batch size the file "
                                     "is converted for (.tflite default 1, LiteRT fixes shapes; .pte default a dynamic "
                                     "batch); larger inputs run in chunks."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Write the model and results.json here."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Convert a model to a runtime's format with that runtime's official tool (OpenVINO:
    ov.convert_model and NNCF; LiteRT: litert-torch; ExecuTorch: torch.export + XNNPACK), then run
    the result in that runtime next to the source on real inputs: fp32 must match within 1e-3
    (max abs diff), int8 within a mean output cosine of 0.99 (tflite/pte int8 also: argmax
    agreement >= 0.95 for a classifier; docs/runtimes.md). int8 needs calibration data: --example
    or --data (exit 2 without). A runtime that is not installed exits 2 with the pip line that
    installs it."""
    from compactai.measure import runtime_plugin
    from compactai.results import write_results

    if fmt not in FORMATS:
        raise UnknownNameError(f"Unknown export format '{fmt}'; choose one of: {', '.join(FORMATS)}.")
    if quantize not in (None, "int8"):
        raise UnknownNameError(f"--quantize must be int8 (or left out for float); got {quantize!r}.")
    if min_quality is not None and quantize is None:
        raise ParameterError("--min-quality applies to --quantize int8; add --quantize int8 or drop it.")
    if batch is not None and fmt not in ("tflite", "pte"):
        raise ParameterError(f"--batch applies to --format tflite or pte (a static batch); --format {fmt} keeps a "
                             "dynamic batch.")
    plugin = runtime_plugin(FORMATS[fmt])
    plugin.require()  # before the model is loaded: a missing extra says so at once
    check_output_dir(out_dir)
    out = Output(json_output)
    with out.progress("Exporting") as say:
        handle, task, info = resolve_model(
            path, example, progress=lambda e, n, acc: say(f"training example {e}/{n}"), hf_task=hf_task
        )
        if data is not None:
            task = task_from_data(data, handle)
        if fmt in ("tflite", "pte") and handle.module is None:
            say("onnx2torch: the ONNX model as a torch module (LiteRT and ExecuTorch convert from torch.export)")
            handle = torch_from_onnx(handle, fmt)
        say(f"converting to {fmt}" + (" int8" if quantize else ""))
        options = {"batch": batch} if batch is not None else {}
        converted = plugin.convert(handle, Path(out_dir), quantize=quantize, task=task, min_quality=min_quality,
                                   **options)
    files = sorted(str(p) for p in Path(out_dir).iterdir() if p.is_file() and p.suffix != ".json")
    result: dict[str, Any] = {
        "command": "export", "format": fmt, "runtime": plugin.name, "quantize": quantize, "source": info,
        "model": str(converted.path), "files": files, "size_bytes": plugin.model_size(converted),
        "parity": converted.metadata.get("parity"), "conversion": converted.metadata.get(plugin.name),
    }
    sections = {k: v for k, v in result.items() if k not in ("command", "model")}
    result["paths"] = {"model": str(converted.path),
                       "results": str(write_results(out_dir, "export", converted, **sections))}
    print_export(out, result)
    out.emit(result)


def torch_from_onnx(handle: Any, fmt: str) -> Any:
    """The ONNX model as an nn.Module (onnx2torch, parity-checked: the path `compactai prune` uses),
    since the LiteRT and ExecuTorch converters start from torch.export."""
    from compactai.errors import UnsupportedFormatError
    from compactai.techniques.prune.convert import onnx_to_module

    try:
        return onnx_to_module(handle)
    except UnsupportedFormatError as exc:
        reason = str(exc).split(": ", 1)[-1]  # drop onnx_to_module's "Cannot prune 'name'" lead
        raise UnsupportedFormatError(f"--format {fmt} converts from torch, and '{handle.name}' is ONNX that "
                                     f"onnx2torch cannot turn into torch: {reason}") from exc


def print_export(out: Output, result: dict[str, Any]) -> None:
    parity = result.get("parity") or {}
    rows: list[list[Any]] = [["format", result["format"]], ["runtime", result["runtime"]],
                             ["precision", result["quantize"] or "fp32"], ["size (MB)", (result["size_bytes"] or 0) / 1e6]]
    for name, diff in (parity.get("max_abs_diff") or {}).items():
        rows.append([f"parity {name}: max abs diff", diff])
    for name, cosine in (parity.get("mean_cosine") or {}).items():
        rows.append([f"parity {name}: mean cosine", cosine])
    for name, agreement in (parity.get("argmax_agreement") or {}).items():
        rows.append([f"parity {name}: argmax agreement", agreement])
    if parity.get("sentence_cosine"):
        rows.append(["sentence cosine min / mean", "{min:.4f} / {mean:.4f}".format(**parity["sentence_cosine"])])
    if parity.get("quality"):
        quality = parity["quality"]
        source = "" if quality["source"] is None else f" (source {quality['source']:.4f})"
        rows.append([f"{quality['metric']} ({quality['split']})", f"{quality['value']:.4f}{source}"])
    if parity:
        rows.append(["parity tolerance", ", ".join(f"{k} {v:g}" for k, v in parity["tolerance"].items())])
        rows.append(["parity samples", parity.get("samples")])
    out.console.print(table(f"compactai export -> {result['model']}", ["figure", "value"], rows))
