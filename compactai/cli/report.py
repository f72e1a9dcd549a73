"""`compactai report --decision`: the cloud-vs-local decision report (HTML + JSON)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import typer

from compactai.cli._common import JSON_OPTION, Output, app, check_output_dir, table
from compactai.errors import BadInputError, ModelNotFoundError


@app.command()
def report(
    decision: Path = typer.Option(..., "--decision", help="Measured figures: a compactai output directory or its "
                                  "results.json (original = baseline, compressed = the written model), a bundle "
                                  "directory built from one, or the JSON of `compactai bench -o`."),
    original: Path | None = typer.Option(None, "--original", help="With bench JSON: the original model's bench JSON "
                                         "(default: the same figures for both)."),
    assumptions: Path | None = typer.Option(None, "--assumptions", "-a", help="JSON object of assumptions "
                                            "(see docs/bench.md for names, units and defaults)."),
    output: Path = typer.Option(Path("decision"), "--output", "-o", help="Directory for decision.html and decision.json."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Cloud or local? From measured figures and stated assumptions (requests per day and peak,
    network round trip and upload bandwidth, payload, cloud price and throughput, local hardware
    price, lifetime and power, electricity and egress prices): latency including the network,
    throughput needed vs available, cost per month and per million inferences, energy per
    inference (estimated), the break-even volume, what data leaves the device and how updates
    reach it. Nothing is fetched live."""
    from compactai.report.decision import decide, figures_of, load_assumptions
    from compactai.report.decision_html import write_decision

    out = Output(json_output)
    check_output_dir(output)
    stated = load_assumptions(assumptions)
    source, kind = _read_source(decision)
    compressed = figures_of(source, "compressed")
    if kind == "bench":
        base = _read_source(original)[0] if original else source
        original_figures = figures_of(base, "original")
        described = f"compactai bench JSON {decision}" + (f" (original: {original})" if original else
                                                             " (no --original: the same model in both local columns)")
    else:
        if original is not None:
            raise BadInputError("--original is for bench JSON; a results.json or bundle already holds the original.")
        original_figures = figures_of(source, "original")
        described = f"{kind} {decision} (original = its baseline, compressed = its model; measured with ONNX Runtime)"
    result = decide(original_figures, compressed, stated)
    result.update(model=compressed.get("name") or "model", figures_source=described, roofline=_roofline(source),
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    output.mkdir(parents=True, exist_ok=True)
    tmp = output / "decision.json.tmp"
    tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
    os.replace(tmp, output / "decision.json")
    html_path = write_decision(result, output / "decision.html")
    result["written"] = {"html": str(html_path), "json": str(output / "decision.json")}
    _print(out, result)
    out.emit(result)


def _read_source(path: Path) -> tuple[dict[str, Any], str]:
    """(data, kind): kind is "bench", "results" or "bundle"."""
    if path.is_dir():
        if (path / "manifest.json").is_file():
            from compactai.bundle import parse_manifest, read_metadata

            return parse_manifest(read_metadata(path)[0]), "bundle"
        path = path / "results.json"
    if not path.is_file():
        raise ModelNotFoundError(f"Not found: {path}. Pass a results.json, an output directory, a bundle directory "
                                 "or `compactai bench -o` JSON.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"{path} is not JSON ({exc}); pass results.json or bench JSON.") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path} must hold one JSON object.")
    return data, "bench" if "scenarios" in data else "results"


def _roofline(source: dict[str, Any]) -> str | None:
    """One sentence from bench's roofline, or computed from a results.json's measured MACs and throughput."""
    roof = source.get("roofline")
    if roof is None:
        measured = ((source.get("measurements") or {}).get("onnxruntime")) or {}
        if not measured.get("macs") or not measured.get("throughput_items_per_s"):
            return None
        from compactai.measure.roofline import roofline

        int8 = any(step.get("technique") == "quantize" for step in source.get("recipe") or [])
        roof = roofline(measured["macs"], measured["throughput_items_per_s"], measured.get("threads") or 1, int8)
    if roof.get("fraction_of_peak") is None:
        return None
    precision = roof["precision"]
    return (f"{roof['achieved_gmacs']:.2f} GMAC/s achieved = {100 * roof['fraction_of_peak']:.1f}% of this CPU's "
            f"{precision} peak {roof[precision + '_peak_gmacs']:.1f} GMAC/s ({roof['formula']}: "
            f"{roof[precision + '_macs_per_cycle']} MACs/cycle/core [{roof[precision + '_basis']}] x {roof['cores']} "
            f"cores x {roof['clock_ghz']:.2f} GHz; {roof['achieved_formula']})."
            + (f" Note: {roof['caveat']}." if roof.get("caveat") else ""))


def _print(out: Output, result: dict[str, Any]) -> None:
    sides = result["sides"]
    rows = [[label] + [side[key] for side in sides] for label, key in (
        ("latency p90 incl. network (ms)", "latency_p90_ms"), ("units needed", "units"),
        (f"available QPS (needed: {result['peak_qps']:.1f})", "available_qps"), ("cost per month (USD)", "cost_per_month"),
        ("cost per million (USD)", "cost_per_million"), ("energy per inference (mJ, est.)", "energy_mj"))]
    out.console.print(table(f"Cloud or local: {result['model']}", ["figure"] + [f"{s['where']}: {s['model']}" for s in sides],
                            rows))
    even = result["break_even"]["requests_per_day"]
    out.console.print(f"cheapest: {result['cheapest']}; break-even {even:,.0f} requests/day" if even else
                      f"cheapest: {result['cheapest']}")
    out.console.print(f"wrote {result['written']['html']} and {result['written']['json']}")
