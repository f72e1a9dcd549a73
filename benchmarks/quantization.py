"""Quantization on this machine (issue 3): MiniLM accuracy-aware int8 against ONNX Runtime's
own ``quantize_dynamic`` (default and per-channel), the per-op sensitivity table, digits static
int8 (accuracy, size, batch-1 and batch-256 latency vs fp32), PTQ at an aggressive setting
against QAT, and the float reductions (fp16/bf16/int4) where ORT runs them. Run it under the
benchmark lock:

    flock /tmp/compactai-bench.lock .venv/bin/python benchmarks/quantization.py

Latency: every model of a comparison is measured in interleaved rounds (so that load from
other processes hits all of them alike) with compactai.measure; the figures are medians of
all rounds. Prints tables and writes benchmarks/results/quantization.json.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from compactai import Context, load_example
from compactai.errors import TechniqueError
from compactai.measure import batch_feeds, environment, make_runner, measure_latency, size_on_disk
from compactai.models.handle import ModelHandle
from compactai.techniques import create_technique

RESULTS = Path(__file__).parent / "results" / "quantization.json"
WORK = (
    Path(tempfile.gettempdir()) / "compactai-bench-quantization"
)  # models are large: keep them out of the repo
console = Console(width=140)
ROUNDS = 5


def latencies(
    handles: dict[str, ModelHandle],
    batches: tuple[int, ...],
    runtime: str = "onnxruntime",
    queries: int = 100,
) -> dict[str, dict[str, float]]:
    """p50/p90 per model and batch, measured in ``ROUNDS`` interleaved rounds."""
    runners = {
        name: make_runner(h, "torch" if name == "torch fp32 eager" else runtime)
        for name, h in handles.items()
    }
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(ROUNDS):
        for batch in batches:
            for name, handle in handles.items():
                feeds = {k: v[:1] for k, v in handle.example_inputs.items()}
                feeds = batch_feeds(feeds, batch) if batch > 1 else feeds
                count = queries if batch == 1 else max(5, queries // 10)
                stats = measure_latency(runners[name], feeds, min_queries=count, min_seconds=0.5, warmup=5)
                samples.setdefault((name, batch), []).extend(stats.samples_ms)
    result: dict[str, dict[str, float]] = {}
    for (name, batch), values in samples.items():
        result.setdefault(name, {})[f"b{batch}_p50_ms"] = float(np.percentile(values, 50))
        result[name][f"b{batch}_p90_ms"] = float(np.percentile(values, 90))
    return result


def show(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(
            *[
                f"{v:.4f}"
                if isinstance(v, float) and abs(v) < 10
                else f"{v:.1f}"
                if isinstance(v, float)
                else str(v)
                for v in row
            ]
        )
    console.print(table)


def minilm_section(report: dict[str, Any]) -> None:
    from onnxruntime.quantization import quantize_dynamic

    example = load_example("minilm")
    handle, task = example.handle, example.task
    work = WORK / "minilm"
    work.mkdir(parents=True, exist_ok=True)
    float_onnx = handle.to_onnx(work / "float.onnx")
    models: dict[str, ModelHandle] = {"onnx fp32": float_onnx}
    for label, kwargs in (
        ("ORT quantize_dynamic default", {}),
        ("ORT quantize_dynamic per_channel", {"per_channel": True}),
    ):
        path = work / (label.replace(" ", "_") + ".onnx")
        quantize_dynamic(str(float_onnx.path), str(path), **kwargs)
        models[label] = float_onnx.as_onnx(path)
    started = time.monotonic()
    context = Context(task=task, work_dir=work, progress=lambda m: console.print(f"[dim]  {m}[/dim]"))
    auto = create_technique("quantize", mode="auto", min_quality=0.99).apply(handle, context)
    auto_seconds = time.monotonic() - started
    summary = auto.metadata["quantize"]
    models["compactai auto (min 0.99)"] = auto
    for mode in ("fp16", "bf16", "int4"):
        try:
            models[f"compactai {mode}"] = create_technique("quantize", mode=mode, objective="size").apply(
                handle, context
            )
        except TechniqueError as exc:
            report.setdefault("minilm_not_offered", {})[mode] = str(exc)
    console.print("[dim]  fidelity on the held-out test split[/dim]")
    fidelity = {name: task.evaluate(make_runner(h)).details for name, h in models.items()}
    console.print("[dim]  latency (interleaved rounds)[/dim]")
    timing = latencies({"torch fp32 eager": handle, **models}, (1, 32))
    torch_b1 = timing["torch fp32 eager"]["b1_p50_ms"]
    rows, data = [], {}
    for name, h in models.items():
        f, t = fidelity[name], timing[name]
        data[name] = {**f, **t, "size_bytes": size_on_disk(h.path), "vs_torch_b1": t["b1_p50_ms"] / torch_b1}
        rows.append(
            [
                name,
                f["cosine_min"],
                f["cosine_mean"],
                f["knn_overlap"],
                t["b1_p50_ms"],
                t["b1_p90_ms"],
                t["b32_p50_ms"],
                f"{t['b1_p50_ms'] / torch_b1:.3f}x",
                f"{size_on_disk(h.path) / 1e6:.1f}",
            ]
        )
    rows.append(
        [
            "torch fp32 eager",
            1.0,
            1.0,
            1.0,
            torch_b1,
            timing["torch fp32 eager"]["b1_p90_ms"],
            timing["torch fp32 eager"]["b32_p50_ms"],
            "1.000x",
            "-",
        ]
    )
    data["torch fp32 eager"] = timing["torch fp32 eager"]
    show(
        "MiniLM (all-MiniLM-L6-v2): fidelity to fp32 on 500 held-out test sentences; ORT latency, 2 threads",
        [
            "model",
            "cos min",
            "cos mean",
            "10-NN overlap",
            "b1 p50 ms",
            "b1 p90 ms",
            "b32 p50 ms",
            "b1 vs torch",
            "MB",
        ],
        rows,
    )
    ours = data["compactai auto (min 0.99)"]
    checks = {
        "cosine_min >= 0.99": ours["cosine_min"] >= 0.99,
        "cosine_mean >= 0.997": ours["cosine_mean"] >= 0.997,
        "b1 p50 <= 0.35x torch fp32 eager": ours["vs_torch_b1"] <= 0.35,
    }
    for other in ("ORT quantize_dynamic default", "ORT quantize_dynamic per_channel"):
        o = data[other]
        checks[f"dominates {other}"] = (
            ours["cosine_min"] >= o["cosine_min"]
            and ours["cosine_mean"] >= o["cosine_mean"]
            and ours["b1_p50_ms"] <= o["b1_p50_ms"]
            and ours["b32_p50_ms"] <= o["b32_p50_ms"]
        )
    for check, ok in checks.items():
        console.print(f"  {'PASS' if ok else 'FAIL'}  {check}")
    for mode, message in report.get("minilm_not_offered", {}).items():
        console.print(f"  [yellow]{mode}:[/yellow] {message}")
    sensitivity = summary.get("sensitivity")
    if sensitivity:
        from compactai.techniques.quantize.sensitivity import (
            SENSITIVITY_COLUMNS,
            report_from_dict,
            sensitivity_rows,
        )

        sens = report_from_dict(sensitivity)
        show(
            f"MiniLM per-op sensitivity ({sens.split} split, {sens.samples} sentences, cosine_min; float "
            f"{sens.float_quality:.4f}, all int8 {sens.all_quantized_quality:.4f}); most sensitive first",
            SENSITIVITY_COLUMNS,
            sensitivity_rows(sens),
        )
    console.print(
        f"auto kept {len(summary.get('float_ops', []))} op(s) in float: {summary.get('float_ops')}; "
        f"config {summary.get('chosen_config', {}).get('mode')}, search took {auto_seconds:.0f} s"
    )
    report["minilm"] = {
        "models": data,
        "checks": checks,
        "auto": {k: v for k, v in summary.items() if k != "sensitivity"},
        "sensitivity": sensitivity,
        "auto_seconds": auto_seconds,
    }


def digits_section(report: dict[str, Any], qat_epochs: int) -> None:
    example = load_example("digits")
    handle, task = example.handle, example.task
    work = WORK / "digits"
    work.mkdir(parents=True, exist_ok=True)
    context = Context(task=task, work_dir=work, progress=lambda m: console.print(f"[dim]  {m}[/dim]"))
    float_onnx = handle.to_onnx(work / "float.onnx")
    static = create_technique("quantize", mode="static", objective="size").apply(handle, context)
    aggressive = {"per_channel": False, "format": "qdq", "weight_bits": 4, "calibration": "minmax"}
    ptq = create_technique("quantize", mode="static", objective="size", **aggressive).apply(handle, context)
    started = time.monotonic()
    qat = create_technique("qat", epochs=qat_epochs, **aggressive).apply(handle, context)
    qat_seconds = time.monotonic() - started
    models = {
        "onnx fp32": float_onnx,
        "static int8 (per-channel, minmax, 128 calib)": static,
        "PTQ aggressive (per-tensor int4 weights, QDQ)": ptq,
        f"QAT {qat_epochs} epochs, same setting": qat,
    }
    accuracy = {name: task.evaluate(make_runner(h)).value for name, h in models.items()}
    timing = latencies(models, (1, 256))
    float_size = size_on_disk(float_onnx.path)
    rows, data = [], {}
    base = timing["onnx fp32"]
    for name, h in models.items():
        t, size = timing[name], size_on_disk(h.path)
        data[name] = {"accuracy": accuracy[name], "size_bytes": size, "size_ratio": float_size / size, **t}
        rows.append(
            [
                name,
                accuracy[name],
                f"{(accuracy['onnx fp32'] - accuracy[name]) * 100:+.2f}",
                f"{float_size / size:.2f}x",
                t["b1_p50_ms"],
                t["b1_p90_ms"],
                f"{base['b1_p50_ms'] / t['b1_p50_ms']:.2f}x",
                t["b256_p50_ms"],
                f"{base['b256_p50_ms'] / t['b256_p50_ms']:.2f}x",
            ]
        )
    show(
        "digits CNN (test split, 360 images); ORT, 2 threads",
        [
            "model",
            "accuracy",
            "drop (points)",
            "smaller",
            "b1 p50 ms",
            "b1 p90 ms",
            "b1 speed-up",
            "b256 p50 ms",
            "b256 speed-up",
        ],
        rows,
    )
    s = data["static int8 (per-channel, minmax, 128 calib)"]
    checks = {
        "static int8 drop <= 0.5 points": (accuracy["onnx fp32"] - s["accuracy"]) * 100 <= 0.5,
        "static int8 >= 3.5x smaller": s["size_ratio"] >= 3.5,
        "QAT recovers accuracy PTQ lost": data[f"QAT {qat_epochs} epochs, same setting"]["accuracy"]
        > data["PTQ aggressive (per-tensor int4 weights, QDQ)"]["accuracy"],
    }
    for check, ok in checks.items():
        console.print(f"  {'PASS' if ok else 'FAIL'}  {check}")
    for batch in (1, 256):
        faster = s[f"b{batch}_p50_ms"] < base[f"b{batch}_p50_ms"]
        console.print(
            f"  static int8 is {'FASTER' if faster else 'NOT faster'} than fp32 at batch {batch} "
            f"({s[f'b{batch}_p50_ms']:.3f} vs {base[f'b{batch}_p50_ms']:.3f} ms p50)"
        )
    report["digits"] = {
        "models": data,
        "checks": checks,
        "qat_seconds": qat_seconds,
        "qat": qat.metadata["quantize"],
        "static": static.metadata["quantize"],
    }


def main() -> None:
    sections = sys.argv[1:] or ["digits", "minilm"]
    report: dict[str, Any] = {"environment": environment(), "rounds": ROUNDS}
    if RESULTS.exists():
        previous = json.loads(RESULTS.read_text())
        report.update({k: v for k, v in previous.items() if k in ("digits", "minilm") and k not in sections})
    if "digits" in sections:
        digits_section(report, qat_epochs=2)
    if "minilm" in sections:
        minilm_section(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    from compactai.results import to_jsonable

    RESULTS.write_text(json.dumps(to_jsonable(report), indent=2))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
