"""The NAS report: a self-contained HTML page from the ``results.json`` of ``compactai nas``.

It shows validation quality against measured p90 latency for every measured candidate (the
Pareto front joined, the chosen one marked, the budget as a line), the predictor's accuracy
(predicted vs measured, with Spearman and mean relative error), the fidelity schedule (how many
candidates trained to each rung) and a table of every candidate with its status.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from compactai.report.figures import BASE, CHOSEN, MISS, OK, _svg, plt


def pareto_indices(points: list[tuple[int, float, float]]) -> list[int]:
    """Numbers of the points (number, latency, quality) that no other point beats on both axes."""
    front = []
    for number, latency, quality in points:
        dominated = any(other_latency <= latency and other_quality >= quality and
                        (other_latency, other_quality) != (latency, quality)
                        for _, other_latency, other_quality in points)
        if not dominated:
            front.append(number)
    return front


def quality_latency_svg(results: dict[str, Any]) -> str:
    trained = [c for c in results["candidates"] if c["validation"] is not None and c["latency_p90_ms"] is not None]
    front = set(results["pareto_front"])
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for status, color in (("pruned", MISS), ("ok", OK), ("stopped_by_time", OK)):
        group = [c for c in trained if c["status"] == status]
        if group:
            ax.scatter([c["latency_p90_ms"] for c in group], [c["validation"] for c in group], c=color, alpha=0.75,
                       edgecolors="black", linewidths=0.5, label=status.replace("_", " "))
    points = sorted((c["latency_p90_ms"], c["validation"]) for c in trained if c["number"] in front)
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], "--", color="#555555", linewidth=1, label="Pareto front")
    chosen = results.get("chosen")
    if chosen:
        ax.scatter([chosen["latency_p90_ms"]], [chosen["validation"]], s=160, facecolors="none", edgecolors=CHOSEN,
                   linewidths=2, label="chosen")
    ax.axvline(results["budget_ms"], color=BASE, linestyle=":", label="budget (p90)")
    ax.set_xlabel("measured p90 latency, batch 1 (ms)")
    ax.set_ylabel("validation quality")
    ax.legend(fontsize=8)
    return _svg(fig)


def predictor_svg(results: dict[str, Any]) -> str:
    measured = [c for c in results["candidates"] if c["latency_p50_ms"] is not None and c["predicted_ms"] is not None]
    fig, ax = plt.subplots(figsize=(5.0, 4.0))
    for rejected, color, label in ((False, OK, "screened in"), (True, MISS, "rejected (audited)")):
        group = [c for c in measured if (c["status"] == "rejected") == rejected]
        if group:
            ax.scatter([c["predicted_ms"] for c in group], [c["latency_p50_ms"] for c in group], c=color,
                       edgecolors="black", linewidths=0.5, label=label)
    if measured:
        top = max(max(c["predicted_ms"], c["latency_p50_ms"]) for c in measured)
        ax.plot([0, top], [0, top], "--", color="#555555", linewidth=1, label="exact")
    ax.set_xlabel("predicted (ms)")
    ax.set_ylabel("measured p50 (ms)")
    ax.legend(fontsize=8)
    return _svg(fig)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def render_nas_report(results: dict[str, Any]) -> str:
    predictor = results["predictor"]
    chosen = results.get("chosen") or {}
    rows = "".join(
        "<tr>" + "".join(f"<td>{_cell(c.get(k))}</td>" for k in (
            "number", "status", "predicted_ms", "latency_p50_ms", "latency_p90_ms", "params", "epochs_run",
            "validation")) + f"<td><code>{html.escape(c['label'])}</code></td></tr>"
        for c in results["candidates"])
    schedule = "".join(f"<tr><td>{r['epochs']}</td><td>{r['candidates']}</td></tr>" for r in results["fidelity_schedule"])
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(results["counts"].items()))
    test = results.get("test") or {}
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>compactai nas</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}</style></head><body>
<h1>Architecture search: {html.escape(str(results.get('space_family')))} space</h1>
<p>Budget: p90 batch-1 latency &le; {results['budget_ms']:.4g} ms on ONNX Runtime ({results['threads']} threads).
Stopped by: {html.escape(results['stopped_by'])} after {results['seconds']} s. Candidates: {counts}.
Rejected by the predictor before training: <b>{results['counts'].get('rejected', 0)}</b>.</p>
<h2>Chosen</h2><p>{_cell(chosen.get('label'))}: validation {_cell(chosen.get('validation'))}, test
{_cell(test.get('student'))} (teacher {_cell(test.get('teacher'))}), measured p90 {_cell(chosen.get('latency_p90_ms'))} ms.
Status: <b>{html.escape(results['status'])}</b>. {html.escape(results.get('problem') or '')}</p>
<h2>Quality vs measured latency</h2>{quality_latency_svg(results)}
<h2>Latency predictor</h2><p>Spearman rank correlation {_cell(predictor.get('spearman'))}, mean relative error
{_cell(predictor.get('mean_relative_error'))} over {predictor.get('candidates')} measured candidates
(compared with {html.escape(str(predictor.get('compared_with')))}); parts timed this run:
{predictor.get('parts_timed_this_run')}.</p>{predictor_svg(results)}
<h2>Fidelity schedule (successive halving, resource = epochs)</h2>
<table><tr><th>epochs (rung)</th><th>candidates trained at least that far</th></tr>{schedule}</table>
<h2>Every candidate</h2><table><tr><th>#</th><th>status</th><th>predicted ms</th><th>p50 ms</th><th>p90 ms</th>
<th>params</th><th>epochs</th><th>validation</th><th>architecture</th></tr>{rows}</table></body></html>"""


def write_nas_report(results: dict[str, Any], path: str | Path) -> Path:
    target = Path(path)
    target.write_text(render_nas_report(results), encoding="utf-8")
    return target


__all__ = ["pareto_indices", "render_nas_report", "write_nas_report"]
