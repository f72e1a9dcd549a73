"""Matplotlib figures as inline SVG strings (the report embeds them; no external files)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

OK, MISS, CHOSEN, BASE = "#2b8cbe", "#bdbdbd", "#e6550d", "#31a354"


def _svg(fig: Any) -> str:
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def pareto_svg(results: dict[str, Any]) -> str:
    """Quality vs measured p90 latency; marker area ~ size on disk; the front joined by a line."""
    trials = [t for t in results["trials"] if t["status"] == "ok"]
    front = set(results["selection"]["pareto_front"])
    chosen = (results.get("chosen") or {}).get("trial")
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    sizes = [t["figures"].get("size_mb") or 0.0 for t in trials] + [results["baseline"].get("size_mb") or 0.0]
    scale = 250.0 / max(*sizes, 1e-09)

    def area(size_mb: float | None) -> float:
        return 20.0 + (size_mb or 0.0) * scale

    for feasible, color, label in ((False, MISS, "outside budget"), (True, OK, "within budget")):
        group = [t for t in trials if t["feasible"] == feasible]
        if group:
            ax.scatter([t["figures"]["latency_p90_ms"] for t in group], [t["figures"]["quality"] for t in group],
                       s=[area(t["figures"].get("size_mb")) for t in group], c=color, alpha=0.7,
                       edgecolors="black", linewidths=0.5, label=label)
    points = sorted((t["figures"]["latency_p90_ms"], t["figures"]["quality"]) for t in trials if t["number"] in front)
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], "--", color="#555555", linewidth=1, label="Pareto front")
    base = results["baseline"]
    ax.scatter([base["latency_p90_ms"]], [base["quality"]], marker="*", s=area(base.get("size_mb")) + 80, c=BASE,
               edgecolors="black", label="original")
    for t in trials:
        if t["number"] == chosen:
            ax.scatter([t["figures"]["latency_p90_ms"]], [t["figures"]["quality"]], s=area(t["figures"].get("size_mb")),
                       facecolors="none", edgecolors=CHOSEN, linewidths=2.5, label="chosen")
    for c in results["budget"]["constraints"]:
        if c["key"] == "latency_p90_ms":
            ax.axvline(c["value"], color=CHOSEN, linestyle=":", linewidth=1)
        if c["key"] == "quality":
            ax.axhline(c["value"], color=CHOSEN, linestyle=":", linewidth=1)
        if c["key"] == "quality_relative" and results["task"].get("baseline_selection"):
            ax.axhline(c["value"] * results["task"]["baseline_selection"], color=CHOSEN, linestyle=":", linewidth=1)
    ax.set_xlabel("measured p90 latency at batch 1 (ms, ONNX Runtime)")
    ax.set_ylabel(f"quality ({results['task']['metric']}, {results['task']['selection_split']} split)")
    ax.set_title("Candidates: quality vs latency (marker area = size on disk)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best", markerscale=0.5)
    return _svg(fig)


def waterfall_svg(results: dict[str, Any]) -> str:
    """p90 latency and size after each step of the chosen pipeline, quality as a line."""
    steps = [s for s in results.get("waterfall", []) if "error" not in s and s.get("latency_p90_ms") is not None]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    if not steps:
        ax.text(0.5, 0.5, "no chosen pipeline", ha="center", va="center")
        ax.axis("off")
        return _svg(fig)
    labels = [s["step"] if len(s["step"]) < 28 else s["step"][:26] + "..." for s in steps]
    latencies = [s["latency_p90_ms"] for s in steps]
    bars = ax.bar(range(len(steps)), latencies, color=[BASE] + [OK] * (len(steps) - 1), edgecolor="black")
    for bar, step in zip(bars, steps):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{step['latency_p90_ms']:.2f} ms\n"
                f"{(step.get('size_mb') or 0):.2f} MB", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(steps)), labels, rotation=15, fontsize=8)
    ax.set_ylabel("p90 latency (ms)")
    ax.set_ylim(0, max(latencies) * 1.3)
    twin = ax.twinx()
    twin.plot(range(len(steps)), [s.get("quality") for s in steps], "o-", color=CHOSEN)
    twin.set_ylabel("quality", color=CHOSEN)
    ax.set_title("Per-technique contribution, from the original to the chosen model")
    return _svg(fig)


def latency_svg(results: dict[str, Any]) -> str:
    """Distribution of batch-1 latencies of the original and the chosen model (final measurement)."""
    samples = results.get("latency_samples_ms", {})
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for name, color in (("original", BASE), ("chosen", CHOSEN)):
        values = samples.get(name) or []
        if values:
            ax.hist(values, bins=50, alpha=0.6, color=color, label=f"{name} (n={len(values)})")
    ax.set_xlabel("batch-1 latency (ms)")
    ax.set_ylabel("queries")
    ax.set_title("Latency distribution (final measurement, ONNX Runtime)")
    ax.legend(fontsize=8)
    return _svg(fig)
