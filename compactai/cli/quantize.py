"""`compactai quantize`: int8 / fp16 / bf16 / int4 / QAT / accuracy-aware mixed precision,
measured next to the float baseline on ONNX Runtime."""

from __future__ import annotations

import shutil
import time
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
    check_time_limit,
    resolve_model,
    table,
    task_from_data,
)

CLI_MODES = ("dynamic", "static", "fp16", "bf16", "int4", "qat", "auto")


@app.command()
def quantize(
    path: str | None = typer.Argument(
        None, help="Model: .onnx, .pt2 or Hugging Face directory; or --example."
    ),
    example: str | None = EXAMPLE_OPTION,
    hf_task: str | None = HF_TASK_OPTION,
    data: Path | None = typer.Option(
        None,
        "--data",
        help="Task data for PATH: .npz with '<split>/<input>' arrays "
        "(splits calibration, validation, test; optional '<split>/labels').",
    ),
    mode: str = typer.Option("auto", "--mode", "-m", help="dynamic, static, fp16, bf16, int4, qat or auto."),
    min_quality: float | None = typer.Option(
        None, "--min-quality", help="auto: absolute quality to keep (validation split), e.g. 0.99 cosine."
    ),
    max_drop: float | None = typer.Option(
        None,
        "--max-drop",
        help="auto: allowed drop in metric points (0.5 = half an accuracy point). Default for auto: 1.0.",
    ),
    per_tensor: bool = typer.Option(
        False, "--per-tensor", help="One weight scale per tensor (default per channel)."
    ),
    fmt: str = typer.Option("qoperator", "--format", help="Static int8 format: qoperator or qdq."),
    calibration: str = typer.Option("minmax", help="Static calibration: minmax, entropy or percentile."),
    calibration_samples: int = typer.Option(
        128, "--calibration-samples", help="Rows of the calibration split."
    ),
    reduce_range: str = typer.Option("auto", "--reduce-range", help="7-bit int8 weights: auto (on where this CPU "
                                     "lacks VNNI, whose absence makes 8-bit u8s8 kernels saturate), on or off."),
    weight_bits: int = typer.Option(8, "--weight-bits", help="8, or 4 (static QDQ / QAT only)."),
    weight_type: str = typer.Option("int8", "--weight-type", help="int8 or uint8 weights for dynamic/static int8. "
                                    "uint8 runs on u8u8 kernels, which keep all 8 bits on CPUs without VNNI "
                                    "(auto tries it there by itself)."),
    block_size: int = typer.Option(
        32, "--block-size", help="int4 weight-only block size: 16, 32, 64 or 128."
    ),
    exclude: list[str] = typer.Option([], "--exclude", help="Node name to keep in float (repeat)."),
    outlier_scaling: str = typer.Option(
        "auto", "--outlier-scaling",
        help="auto (transformers), on or off: rescale activation channels whose calibrated range exceeds "
        "--outlier-threshold x the median channel, so per-tensor int8 activations keep their precision.",
    ),
    outlier_threshold: float = typer.Option(3.0, "--outlier-threshold", help="Outlier channel: range > this x median."),
    preprocess: bool = typer.Option(
        True, "--preprocess/--no-preprocess", help="Graph pre-processing (attention fusion, shape inference)."
    ),
    objective: str = typer.Option("latency", help="latency (keep float if int8 is not faster) or size; with "
                                  "--runtime auto/NAME also throughput (write the fastest at the --batch size)."),
    runtime: str = typer.Option("onnxruntime", "--runtime", "-r", help="onnxruntime (default), another installed "
                                "runtime (openvino), or auto: measure every candidate on every installed runtime "
                                "(plus each runtime's own int8) and keep the fastest that meets the quality floor."),
    rounds: int = typer.Option(3, "--rounds", help="--runtime auto/NAME: interleaved timing rounds per candidate."),
    batch: int = typer.Option(32, "--batch", help="--runtime auto/NAME: batch size of the throughput figure."),
    sensitivity_samples: int = typer.Option(
        100, "--sensitivity-samples", help="auto: validation rows per sensitivity evaluation."
    ),
    max_float_fraction: float = typer.Option(
        0.5, "--max-float-fraction", help="auto: most ops left in float."
    ),
    epochs: int = typer.Option(3, help="qat: fine-tuning epochs."),
    lr: float = typer.Option(1e-4, help="qat: learning rate."),
    max_batches: int = typer.Option(0, "--max-batches", help="qat: cap on batches per epoch (0 = all)."),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Write model.onnx and results.json here."),
    threads: int | None = typer.Option(None, help="Intra-op threads (default: all CPUs of this process)."),
    queries: int = typer.Option(200, help="Minimum timed batch-1 queries per measurement."),
    seconds: float = typer.Option(1.0, help="Minimum seconds of timed batch-1 queries."),
    time_limit: float | None = typer.Option(None, "--time-limit", help="Seconds for the auto search."),
    seed: int = typer.Option(0, help="Seed."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Quantize a model and measure it next to the float baseline: quality, size, p50/p90 latency
    and speed-up on ONNX Runtime; writes OUT/model.onnx + results.json (with the sensitivity table)."""
    from compactai.errors import ParameterError, UnknownNameError
    from compactai.measure import MeasureConfig, measure
    from compactai.search.runtimes import resolve_runtimes
    from compactai.techniques import Context, create_technique
    from compactai.techniques.quantize import QualityTargetNotMetError

    if mode not in CLI_MODES:
        raise UnknownNameError(f"Unknown quantization mode '{mode}'; choose one of: {', '.join(CLI_MODES)}.")
    runtimes = resolve_runtimes(runtime)  # an unknown or uninstalled runtime fails before any work
    if objective == "throughput" and runtime == "onnxruntime":
        raise ParameterError("--objective throughput chooses between runtimes; add --runtime auto (or a runtime name).")
    if not 1 <= rounds <= 100:
        raise ParameterError(f"--rounds must be a whole number from 1 to 100; got {rounds}.")
    out = Output(json_output)
    # settings both techniques share: how the int8 model is laid out and calibrated
    reduce_choices = {"auto": "auto", "on": True, "off": False}
    if reduce_range not in reduce_choices:
        raise UnknownNameError(f"--reduce-range must be auto, on or off. Got {reduce_range!r} instead.")
    common = {"per_channel": not per_tensor, "format": fmt, "calibration": calibration,
                  "calibration_samples": calibration_samples, "reduce_range": reduce_choices[reduce_range], "weight_bits": weight_bits}
    if mode == "qat" and weight_type != "int8":
        raise ParameterError("--weight-type applies to dynamic/static int8; QAT exports int8 weights. Drop --weight-type.")
    if mode == "qat":
        technique = create_technique("qat", epochs=epochs, lr=lr, max_batches=max_batches, **common)
    else:
        technique = create_technique(
            "quantize",
            mode=mode,
            block_size=block_size,
            nodes_to_exclude=list(exclude) or None,
            min_quality=min_quality,
            max_drop=max_drop,
            objective="latency" if objective == "throughput" else objective,
            sensitivity_samples=sensitivity_samples,
            max_float_fraction=max_float_fraction,
            outlier_scaling=outlier_scaling,
            outlier_threshold=outlier_threshold,
            preprocess=preprocess,
            weight_type=weight_type,
            **common,
        )
    technique.validate()  # bad parameters fail before any model is loaded
    config = MeasureConfig(
        min_queries=queries, min_seconds=seconds, memory=False, energy=False, threads=threads, throughput_batch=batch
    )
    config.check()
    check_time_limit(time_limit)
    check_output_dir(out_dir)
    result: dict[str, Any] = {"command": "quantize", "mode": mode, "technique": technique.name}
    with out.progress("Quantizing") as say:
        handle, task, info = resolve_model(
            path, example, progress=lambda e, n, acc: say(f"training example {e}/{n}"), hf_task=hf_task
        )
        if data is not None:
            task = task_from_data(data, handle)
        result["source"] = info
        baseline = {}
        for name in ("onnxruntime", "torch") if handle.module is not None else ("onnxruntime",):
            say(f"baseline on {name}")
            baseline[name] = measure(handle, task, runtime=name, config=config)
        result["baseline"] = {k: v.to_dict() for k, v in baseline.items()}
        work_dir = (out_dir or Path.cwd()) / ".compactai-work"
        context = Context(
            task=task,
            teacher=handle,
            seed=seed,
            progress=say,
            threads=threads,
            work_dir=work_dir,
            deadline=time.monotonic() + time_limit if time_limit else None,
        )
        started = time.monotonic()
        if runtime != "onnxruntime":
            from compactai.cli._runtime_choice import choose_runtime

            result["status"] = "ok"
            choose_runtime(out, result, handle, technique, context, task, config, out_dir, seed,
                           runtimes=runtimes, min_quality=min_quality, max_drop=max_drop, objective=objective,
                           rounds=rounds)
            out.emit(result)
            return
        try:
            quantized = technique.apply(handle, context)
        except QualityTargetNotMetError as exc:
            result["status"] = "target_not_met"
            result["error"] = str(exc)
            result["best_quality_validation"] = exc.quality
            if exc.best is not None and out_dir is not None:
                say("writing the best model found")
                finish(out, result, exc.best, task, config, out_dir, seed, time.monotonic() - started)
            raise
        result["status"] = "ok"
        finish(out, result, quantized, task, config, out_dir, seed, time.monotonic() - started)
    print_quantize(out, result)
    out.emit(result)


def finish(
    out: Output,
    result: dict[str, Any],
    quantized: Any,
    task: Any,
    config: Any,
    out_dir: Path | None,
    seed: int,
    seconds: float,
) -> None:
    """Measure the quantized model and write OUT/model.onnx + results.json (+ the sensitivity plot)."""
    from compactai.measure import measure
    from compactai.results import save_model, write_results

    summary = dict(quantized.metadata.get("quantize", {}))
    result["seconds"] = round(seconds, 1)
    result["measurements"] = {
        "onnxruntime": measure(quantized, task, runtime="onnxruntime", config=config).to_dict()
    }
    result["quality"] = result["measurements"]["onnxruntime"].get("quality")
    result["sensitivity"] = summary.pop("sensitivity", None)
    plot = summary.pop("sensitivity_plot", None)
    result["quantization"] = summary
    if out_dir is not None:
        model_path = save_model(quantized, out_dir)
        paths = {"model": str(model_path)}
        if plot and Path(plot).exists():
            paths["sensitivity_plot"] = str(shutil.copyfile(plot, Path(out_dir) / "sensitivity.png"))
        result["paths"] = paths
        sections = {k: v for k, v in result.items() if k != "command"}
        paths["results"] = str(write_results(out_dir, "quantize", quantized, seed=seed, **sections))


def print_quantize(out: Output, result: dict[str, Any]) -> None:
    """Baseline vs quantized: quality, size, p50/p90 latency, throughput and speed-ups."""
    base, new = result["baseline"]["onnxruntime"], result["measurements"]["onnxruntime"]
    torch_base = result["baseline"].get("torch")
    rows: list[list[Any]] = []

    def ratio(a: Any, b: Any, word: str) -> str:
        return (
            f"{a / b:.2f}x {word}"
            if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b
            else "-"
        )

    quality = new.get("quality")
    if quality:
        details = quality.get("details", {})
        rows.append(
            [
                f"quality ({quality['metric']})",
                quality["baseline"],
                quality["value"],
                f"{quality['value'] - quality['baseline']:+.4f}"
                if quality.get("baseline") is not None
                else "-",
            ]
        )
        for key in ("cosine_mean", "knn_overlap"):
            if key in details:
                rows.append(
                    [f"  {key}", (base.get("quality") or {}).get("details", {}).get(key), details[key], ""]
                )
    rows.append(
        ["ONNX size (MB)", base["size_mb"], new["size_mb"], ratio(base["size_mb"], new["size_mb"], "smaller")]
    )
    summary = result.get("quantization", {})
    decided = summary.get("float_latency_p50_ms") is not None and summary.get("quantized_latency_p50_ms") is not None
    if decided:
        # the measurement the keep/revert decision used, not a second timing that could disagree with it
        float_ms, quant_ms = summary["float_latency_p50_ms"], summary["quantized_latency_p50_ms"]
        rows.append([f"ORT latency p50 (ms), {summary.get('mode', result['mode'])} candidate", float_ms, quant_ms,
                     ratio(float_ms, quant_ms, "speed-up")])
        rows.append(["kept", "", summary.get("kept", "-"), "decided on the row above"])
    else:
        for q in ("p50", "p90"):
            key = f"latency_{q}_ms"
            rows.append([f"ORT latency {q} (ms)", base[key], new[key], ratio(base[key], new[key], "speed-up")])
    if summary.get("kept") != "float":  # a second timing of the same float model would only show noise
        rows.append([
            f"ORT throughput @{new['throughput_batch']} (items/s)",
            base["throughput_items_per_s"],
            new["throughput_items_per_s"],
            ratio(new["throughput_items_per_s"], base["throughput_items_per_s"], ""),
        ])
    if torch_base:
        rows.append(
            [
                "vs PyTorch eager p50 (ms)",
                torch_base["latency_p50_ms"],
                new["latency_p50_ms"],
                ratio(torch_base["latency_p50_ms"], new["latency_p50_ms"], "speed-up"),
            ]
        )
    out.console.print(
        table(f"compactai quantize (mode {result['mode']})", ["figure", "float", "quantized", "change"], rows)
    )
    if summary.get("kept") == "float" or summary.get("note"):
        out.console.print(f"[yellow]note:[/yellow] {summary.get('note')}")
    if summary.get("float_ops") is not None:
        out.console.print(
            f"auto: {len(summary['float_ops'])} op(s) kept in float; config "
            f"{summary.get('chosen_config', {}).get('mode')} "
            f"{'per-channel' if summary.get('chosen_config', {}).get('per_channel') else 'per-tensor'}"
        )
    left = summary.get("left_in_float") or []
    if left:
        where = "the model" if summary.get("kept") != "float" else f"the {summary.get('mode')} candidate"
        out.console.print(f"left in float in {where}: {len(left)} op(s)" + "".join(
            f"\n  {op['op_type']} {op['name']}: {op['reason']}" for op in left[:15])
            + (f"\n  ... {len(left) - 15} more in results.json" if len(left) > 15 else ""), highlight=False)
    sensitivity = result.get("sensitivity")
    if sensitivity:
        from compactai.techniques.quantize.sensitivity import (
            SENSITIVITY_COLUMNS,
            report_from_dict,
            sensitivity_rows,
        )

        report = report_from_dict(sensitivity)
        out.console.print(
            table(
                f"Per-op sensitivity ({report.split}, {report.samples} samples; float "
                f"{report.float_quality:.4f}, all int8 {report.all_quantized_quality:.4f}), top 15",
                SENSITIVITY_COLUMNS,
                sensitivity_rows(report, 15),
            )
        )
    if "paths" in result:
        out.console.print("wrote " + ", ".join(result["paths"].values()))
