"""`compactai profile`: every figure of one model, on torch and ONNX Runtime."""

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
    resolve_model,
    table,
    task_from_data,
)
from compactai.errors import UnknownNameError


@app.command()
def profile(
    path: str | None = typer.Argument(None, help="Model: .onnx file, .pt2 file or Hugging Face directory."),
    example: str | None = EXAMPLE_OPTION,
    data: Path | None = typer.Option(
        None, "--data", help="Task data for PATH (.npz as for quantize): adds quality, judged on its test split."
    ),
    hf_task: str | None = HF_TASK_OPTION,
    runtime: str = typer.Option("all", "--runtime", "-r", help="onnxruntime, torch, openvino (extra), all (torch "
                                "and every installed runtime) or auto (all, and name the fastest at batch 1 and B)."),
    threads: int | None = typer.Option(None, help="Intra-op threads (default: all CPUs of this process)."),
    queries: int = typer.Option(200, help="Minimum timed batch-1 queries (after warm-up)."),
    seconds: float = typer.Option(1.0, help="Minimum seconds of timed batch-1 queries."),
    batch: int = typer.Option(32, help="Batch size for offline throughput."),
    core_watts: float = typer.Option(10.0, help="Watts per busy core, for the energy estimate without RAPL."),
    no_memory: bool = typer.Option(False, "--no-memory", help="Skip the peak-memory subprocess."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Measure a model: quality vs baseline, size, params, MACs, p50/p90/p99 latency, throughput,
    peak memory and energy, on PyTorch eager and ONNX Runtime (with an export parity check)."""
    from compactai.measure import RUNTIME_PLUGINS, MeasureConfig, installed_runtimes
    from compactai.profile import profile_model

    out = Output(json_output)
    wanted = ["torch", *installed_runtimes()] if runtime in ("all", "auto") else [runtime]
    for name in wanted:
        if name not in RUNTIME_PLUGINS:
            raise UnknownNameError(f"Unknown runtime '{name}'; choose {', '.join(RUNTIME_PLUGINS.names())}, all or auto.")
        RUNTIME_PLUGINS.get(name).require()
    config = MeasureConfig(min_queries=queries, min_seconds=seconds, throughput_batch=batch,
                           core_watts=core_watts, memory=not no_memory, threads=threads)
    config.check()  # before the model is loaded
    with out.progress("Profiling") as say:
        handle, task, info = resolve_model(
            path, example, progress=lambda e, n, acc: say(f"training example, epoch {e}/{n}"), hf_task=hf_task
        )
        if data is not None:
            say("reading the task data")
            task = task_from_data(data, handle)
        result = profile_model(handle, task, runtimes=wanted, config=config, progress=say)
    result["source"] = info
    if runtime == "auto":
        result["fastest"] = fastest(result["measurements"])
    print_profile(out, result)
    out.emit(result)


def fastest(measurements: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The runtime with the lowest batch-1 p50 and the one with the highest throughput."""
    return {"batch_1": min(measurements, key=lambda r: measurements[r]["latency_p50_ms"]),
            "throughput": max(measurements, key=lambda r: measurements[r]["throughput_items_per_s"])}


def print_profile(out: Output, result: dict[str, Any]) -> None:
    measurements = result["measurements"]
    names = list(measurements)
    rows: list[list[Any]] = []

    def row(label: str, key: str, scale: float = 1.0) -> None:
        values = [measurements[n].get(key) for n in names]
        rows.append([label] + [v * scale if isinstance(v, (int, float)) and scale != 1.0 else v for v in values])

    quality = {n: measurements[n].get("quality") for n in names}
    if any(quality.values()):
        metric = next(q for q in quality.values() if q)["metric"]
        rows.append([f"quality ({metric})"] + [q and q["value"] for q in quality.values()])
        rows.append(["quality baseline"] + [q and q["baseline"] for q in quality.values()])
    row("size (MB)", "size_mb")
    row("parameters", "params")
    row("MACs (batch 1)", "macs")
    row("latency p50 (ms)", "latency_p50_ms")
    row("latency p90 (ms)", "latency_p90_ms")
    row("latency p99 (ms)", "latency_p99_ms")
    if any(measurements[n].get("latency_batch", 1) != 1 for n in names):
        row("latency batch (fixed by the model)", "latency_batch")
    row("timed queries", "latency_queries")
    row("throughput (items/s)", "throughput_items_per_s")
    row("peak memory (MB)", "peak_memory_mb")
    row("energy (mJ/inference)", "energy_mj")
    row("energy method", "energy_method")
    row("threads", "threads")
    if "fastest" in result:
        rows.append(["fastest"] + [" ".join(w for w in ("batch 1", "throughput") if result["fastest"][w.replace(" ", "_")] == n)
                                   or "-" for n in names])
    model = result["model"]
    loaded = f", {model['architecture']}" if model.get("architecture") else ""
    out.console.print(table(f"Profile of {model['name']} ({model['kind']}, {model['framework']}{loaded})", ["figure", *names], rows))
    outputs = ", ".join(f"{o['name']} {tuple(o['shape'])}" for o in model["outputs"])
    out.console.print(f"outputs: {outputs}" + (f" ({model['output_kind']})" if model.get("output_kind") else ""))
    parity = result.get("parity")
    if parity:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in parity["max_abs_diff"].items())
        line = f"ONNX export parity on {parity['samples']} real inputs: max abs diff {diffs}"
        if parity.get("metric_diff") is not None:
            line += f"; quality diff {parity['metric_diff']:+.5f}"
        for key in ("cosine_min", "cosine_mean"):
            if key in parity:
                line += f"; {key} {parity[key]:.6f}"
        out.console.print(line)
    for n in names:
        if measurements[n].get("energy_formula"):
            out.console.print(f"[dim]energy on {n} ({measurements[n]['energy_method']}): {measurements[n]['energy_formula']}[/dim]")
        for note in measurements[n].get("notes", []):
            out.console.print(f"[yellow]note:[/yellow] {note}")
