"""The work behind `quantize --runtime auto|NAME`: build the candidates on each runtime, measure
them in one run, keep the fastest that meets the quality floor, write it (and the other batch
regime's winner when it differs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compactai.cli._common import Output, table
from compactai.errors import BudgetNotMetError, ParameterError
from compactai.measure import MeasureConfig, make_runner
from compactai.models.handle import ModelHandle
from compactai.search.runtimes import (
    build_candidates,
    candidate_rows,
    measure_candidates,
    winners,
    write_candidate,
)
from compactai.techniques import Context, Technique
from compactai.techniques.quantize import QualityTargetNotMetError


def quality_floor(handle: ModelHandle, task: Any, min_quality: float | None, max_drop: float | None) -> float:
    """The validation-split floor: ``min_quality``, else the float model's quality minus ``max_drop``
    metric points (default 1.0, as quantize's auto mode)."""
    if min_quality is not None:
        return min_quality
    float_quality = task.evaluate(make_runner(handle, "onnxruntime"), "validation").value
    return float(float_quality - (1.0 if max_drop is None else max_drop) / 100.0)


def choose_runtime(
    out: Output, result: dict[str, Any], handle: ModelHandle, technique: Technique, context: Context, task: Any,
    config: MeasureConfig, out_dir: Path | None, seed: int, *, runtimes: list[str], min_quality: float | None,
    max_drop: float | None = None, objective: str = "latency", rounds: int = 3,
) -> None:
    """Fill ``result`` with every candidate's figures and the winners; write the chosen model."""
    if task is None or "validation" not in task.splits:
        raise ParameterError("--runtime auto judges quality on a task's validation and test splits; use --example "
                             "or --data with calibration, validation and test splits.")
    say = context.progress
    floor = quality_floor(handle, task, min_quality, max_drop)
    result["runtime_choice"] = {"runtimes": runtimes, "quality_floor_validation": floor, "objective": objective}
    quantized = None
    if "onnxruntime" in runtimes:
        try:
            quantized = technique.apply(handle, context)
        except QualityTargetNotMetError as exc:
            result.setdefault("notes", []).append(f"compactai's ONNX int8 is not a candidate: {exc}")
        summary = dict(quantized.metadata.get("quantize", {})) if quantized is not None else {}
        summary.pop("sensitivity", None)
        summary.pop("sensitivity_plot", None)
        result["quantization"] = summary
        if summary.get("kept") == "float":
            result.setdefault("notes", []).append(f"compactai's ONNX int8 kept float: {summary.get('note')}")
            quantized = None
    candidates = build_candidates(handle, quantized, runtimes, task, context.work_dir / "runtimes",
                                  min_quality=floor, progress=say)
    measure_candidates(candidates, task, config, rounds=rounds, min_quality=floor, progress=say)
    best = winners(candidates)
    result["runtimes"] = candidate_rows(candidates)
    result["winners"] = {regime: None if c is None else c.label for regime, c in best.items()}
    chosen = best["throughput" if objective == "throughput" else "batch_1"]
    print_candidates(out, result["runtimes"], floor, result["winners"])
    if chosen is None:
        result["status"] = "target_not_met"
        raise BudgetNotMetError(f"No candidate on {', '.join(runtimes)} keeps quality >= {floor:.4f} on the "
                                "validation split; lower --min-quality or keep the float model.")
    result["chosen"] = {"label": chosen.label, "runtime": chosen.runtime, "precision": chosen.precision,
                        "regime": "throughput" if objective == "throughput" else "batch_1"}
    result["quality"] = chosen.figures.get("quality")
    if out_dir is not None:
        result["paths"] = write_candidate(chosen, out_dir, result, seed)
        other = best["batch_1" if objective == "throughput" else "throughput"]
        if other is not None and other is not chosen:
            regime = "batch-1" if objective == "throughput" else f"batch-{config.throughput_batch}"
            result["paths"][f"{regime} winner"] = write_candidate(other, Path(out_dir) / regime, result, seed)["model"]
            out.console.print(f"the {regime} winner ({other.label}) is in {Path(out_dir) / regime}")
        out.console.print("wrote " + ", ".join(str(v) for v in result["paths"].values()))


def print_candidates(out: Output, rows_data: list[dict[str, Any]], floor: float | None,
                     winner_labels: dict[str, str | None]) -> None:
    """One row per candidate (results.json's rows) with its runtime, quality, size, batch-1 p50,
    throughput and status; ``winner_labels``: the label of each batch regime's winner."""
    rows: list[list[Any]] = []
    batch = next((r.get("throughput_batch") for r in rows_data if r.get("throughput_batch")), "B")
    for row in rows_data:
        quality = row.get("quality") or {}
        details = quality.get("details", {})
        if row["error"]:
            status = "failed (below)"
        elif not row.get("meets_floor"):
            status = "below the floor"
        elif row.get("meets_budget") is False:
            status = "misses the budget"
        elif row.get("contender") is False:
            status = "reference"
        else:
            status = " ".join(w for w, label in (("fastest@1", winner_labels.get("batch_1")),
                                                 (f"fastest@{batch}", winner_labels.get("throughput")))
                              if label == row["label"]) or "ok"
        rows.append([row["label"], None if row.get("size_bytes") is None else row["size_bytes"] / 1e6,
                     row.get("quality_validation"), quality.get("value"), details.get("cosine_mean"),
                     row.get("latency_p50_ms"), row.get("throughput_items_per_s"), status])
    rounds = next((r.get("rounds") for r in rows_data if r.get("rounds")), 0)
    floor_text = "none" if floor is None else f"{floor:.4f}"
    out.console.print(table(
        f"Candidates: quality floor {floor_text} (val), quality on val and test, batch-1 p50, "
        f"throughput; {rounds} interleaved rounds",
        ["runtime, precision", "MB", "val", "test", "cos mean", "p50 ms", f"/s @{batch}", "status"], rows))
    for row in rows_data:
        if row["error"]:
            out.console.print(f"[yellow]{row['label']} failed:[/yellow] {row['error']}")
        elif row.get("budget_misses"):
            out.console.print(f"[yellow]{row['label']} misses the budget:[/yellow] {'; '.join(row['budget_misses'])}")
