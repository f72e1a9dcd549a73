"""Benchmark of the main job: `compactai optimize` on the built-in examples.

Runs the CLI with --json (a fresh output directory each time), then prints the original vs
chosen table and the best single technique, and writes benchmarks/results/optimize.json.

usage: python benchmarks/optimize.py [digits] [minilm] [minilm-quarter] [--minutes M]

``minilm-quarter`` is issue 21's bar: a budget int8 alone cannot meet (p90 at most a quarter of the
teacher's) with a floor of 0.90 on mean cosine, within 30 minutes of wall time; training trials
(distillation, NAS students) run on the multi-fidelity schedule. Each run writes its own section.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _results import write_section

ROOT = Path(__file__).resolve().parent
RUNS = {
    "digits": ["--example", "digits", "--max-minutes", "2.5"],  # default budget: p90<=0.5x, size<=0.25x, q>=0.99x
    "minilm": ["--example", "minilm", "--budget", "latency_p90_ms<=0.5x", "--min-quality", "0.99"],
    "minilm-quarter": ["--example", "minilm", "--budget", "latency_p90_ms<=0.25x", "--min-quality", "abs:0.90",
                       "--quality-figure", "cosine_mean", "--max-trials", "40"],
}
SEARCH_MINUTES = {"minilm-quarter": 24.0}  # the bar is 30 minutes of wall time: the search stops starting trials
# after this, leaving time for the re-measurement, the final measurement and the report
KEYS = [("quality (selection split)", "quality"), ("size MB", "size_mb"), ("latency p50 ms", "latency_p50_ms"),
        ("latency p90 ms", "latency_p90_ms"), ("throughput items/s", "throughput_items_per_s"),
        ("peak memory MB", "peak_memory_mb"), ("energy mJ", "energy_mj")]


def run(name: str, minutes: float | None) -> dict:
    out = Path("/tmp") / f"compactai-bench-optimize-{name}"
    shutil.rmtree(out, ignore_errors=True)
    minutes = SEARCH_MINUTES.get(name, minutes)
    args = list(RUNS[name]) + (["--max-minutes", str(minutes)] if minutes and name != "digits" else [])
    load_start = os.getloadavg()  # the load around the run, so that latency noise on a shared machine is visible
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "compactai.cli", "optimize", *args, "-o", str(out), "--json"],
                          capture_output=True, text=True, check=False)
    data = json.loads((out / "results.json").read_text())
    data["exit_code"] = proc.returncode
    data["wall_seconds"] = round(time.monotonic() - started, 1)
    data["command"] = ["compactai", "optimize", *args]
    data["load_average"] = {"start": load_start, "end": os.getloadavg()}
    return data


def best_single(data: dict) -> dict | None:
    singles = [t for t in data["trials"] if t["status"] == "ok" and len(t["recipe"]) == 1 and t["feasible"]]
    return min(singles, key=lambda t: t["figures"]["latency_p90_ms"]) if singles else None


def report(name: str, data: dict) -> None:
    chosen = (data.get("chosen") or {}).get("figures") or {}
    print(f"\n## {name}: budget {data['budget']['text']} (exit code {data['exit_code']})")
    print(data["selection"]["explanation"])
    print("| figure | original | chosen |\n|---|---|---|")
    for label, key in KEYS:
        print(f"| {label} | {data['baseline'].get(key)} | {chosen.get(key)} |")
    if chosen:
        print(f"| test quality | {data['task']['baseline_test']} | {chosen['test_quality']['value']} |")
        print(f"chosen: {data['chosen']['label']}")
    single = best_single(data)
    print("best single technique within budget:",
          "none" if single is None else f"trial {single['number']} p90 {single['figures']['latency_p90_ms']:.3f} ms")
    print(f"trials: {len(data['trials'])}, stopped by {data['search']['stopped_by']}, {data['search']['seconds']:.0f} s "
          f"search, {data['wall_seconds']:.0f} s wall")
    fidelity = data["search"].get("fidelity") or {}
    if fidelity.get("schedule"):
        print("fidelity schedule (epochs: candidates trained to that rung):",
              ", ".join(f"{row['epochs']}: {row['candidates']}" for row in fidelity["schedule"]),
              f"({fidelity['pruned']} stopped early, recorded pruned)")
    if chosen:
        details = chosen["test_quality"].get("details", {})
        if "cosine_mean" in details:
            print(f"chosen test cosine mean / min: {details['cosine_mean']:.4f} / {details['cosine_min']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("examples", nargs="*", default=["digits"])
    parser.add_argument("--minutes", type=float, default=20.0)
    args = parser.parse_args()
    results = {}
    for name in args.examples:
        results[name] = run(name, args.minutes)
        report(name, results[name])
    target = ROOT / "results" / "optimize.json"
    for name, data in results.items():  # each example's section is replaced, the others kept
        write_section(target, name, json.loads(json.dumps(
            {k: v for k, v in data.items() if k not in ("latency_samples_ms", "environment")}, default=str)))


if __name__ == "__main__":
    main()
