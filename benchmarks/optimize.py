"""Benchmark of the main job: `compactai optimize` on the built-in examples.

Runs the CLI with --json (a fresh output directory each time), then prints the original vs
chosen table and the best single technique, and writes benchmarks/results/optimize.json.

usage: python benchmarks/optimize.py [digits] [minilm] [--minutes M]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RUNS = {
    "digits": ["--example", "digits", "--max-minutes", "2.5"],  # default budget: p90<=0.5x, size<=0.25x, q>=0.99x
    "minilm": ["--example", "minilm", "--budget", "latency_p90_ms<=0.5x", "--min-quality", "0.99"],
}
KEYS = [("quality (selection split)", "quality"), ("size MB", "size_mb"), ("latency p50 ms", "latency_p50_ms"),
        ("latency p90 ms", "latency_p90_ms"), ("throughput items/s", "throughput_items_per_s"),
        ("peak memory MB", "peak_memory_mb"), ("energy mJ", "energy_mj")]


def run(name: str, minutes: float | None) -> dict:
    out = Path("/tmp") / f"compactai-bench-optimize-{name}"
    shutil.rmtree(out, ignore_errors=True)
    args = list(RUNS[name]) + (["--max-minutes", str(minutes)] if minutes and name != "digits" else [])
    load_start = os.getloadavg()  # the load around the run, so that latency noise on a shared machine is visible
    proc = subprocess.run([sys.executable, "-m", "compactai.cli", "optimize", *args, "-o", str(out), "--json"],
                          capture_output=True, text=True, check=False)
    data = json.loads((out / "results.json").read_text())
    data["exit_code"] = proc.returncode
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
    print(f"trials: {len(data['trials'])}, stopped by {data['search']['stopped_by']}, {data['search']['seconds']:.0f} s")


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
    target.parent.mkdir(exist_ok=True)
    slim = {k: {kk: vv for kk, vv in v.items() if kk not in ("latency_samples_ms", "environment")} for k, v in results.items()}
    target.write_text(json.dumps(slim, indent=2, default=str))


if __name__ == "__main__":
    main()
