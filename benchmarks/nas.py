"""NAS benchmark (issue 21): the digits bar of `compactai nas` (``--model digits``), and the MiniLM
bar (``--model minilm``, see ``nas_minilm.py``).

Budget: half the teacher's measured p90 batch-1 latency on ONNX Runtime (``latency_p90_ms<=0.5x``).
Bar: test accuracy within 1 point of the teacher's, found in under 15 minutes on 2 cores, with the
chosen model's p90 (re-measured interleaved with the teacher) within the budget. The search runs
as the real CLI in a subprocess; this script times it and reads its --json summary.

Run (one benchmark at a time on a shared machine):
    flock /tmp/compactai-bench.lock nice -n -10 .venv/bin/python benchmarks/nas.py
Prints a table and writes benchmarks/results/nas.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "nas.json"
ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-minutes", type=float, default=12.0, help="the search's own limit (the bar is 15)")
    parser.add_argument("--max-trials", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=18)
    parser.add_argument("--out", type=Path, default=Path("/tmp/compactai-bench-nas"))
    parser.add_argument("--model", choices=["digits", "minilm"], default="digits")
    args, rest = parser.parse_known_args()
    if args.model == "minilm":  # its own options (nas_minilm.py --help)
        from nas_minilm import (
            main as bench_minilm,  # benchmarks/ is not a package: the script's folder is on sys.path
        )

        return bench_minilm(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    load_before = os.getloadavg()
    started = time.monotonic()
    command = [sys.executable, "-m", "compactai.cli", "nas", "--example", "digits", "--budget", "latency_p90_ms<=0.5x",
               "--space", "cnn", "--max-minutes", str(args.max_minutes), "--max-trials", str(args.max_trials),
               "--epochs", str(args.epochs), "-o", str(args.out), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.monotonic() - started
    if not done.stdout.strip():
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    summary = json.loads(done.stdout)
    test, teacher, chosen = summary["test"], summary["teacher"], summary["chosen"]
    gap_points = 100 * (test["teacher"] - test["student"])
    bars = {
        "accuracy_within_1_point": gap_points <= 1.0,
        "meets_latency_budget": summary["status"] == "ok",
        "under_15_minutes": wall < 15 * 60,
    }
    rows = [
        ("teacher test accuracy", f"{test['teacher']:.4f}"), ("chosen test accuracy", f"{test['student']:.4f}"),
        ("gap (points)", f"{gap_points:.2f}"),
        ("teacher p90 (ms)", f"{teacher['latency_p90_ms']:.3f}"), ("budget p90 (ms)", f"{summary['budget_ms']:.3f}"),
        ("chosen p90, re-measured (ms)", f"{chosen['latency_p90_ms_remeasured']:.3f}"),
        ("chosen params", str(chosen["params"])), ("teacher params", str(teacher["params"])),
        ("chosen", chosen["label"]), ("candidates", json.dumps(summary["counts"])),
        ("fidelity schedule", json.dumps(summary["fidelity_schedule"])),
        ("predictor spearman / MRE", f"{summary['predictor'].get('spearman')} / "
                                     f"{summary['predictor'].get('mean_relative_error')}"),
        ("wall time (s)", f"{wall:.0f}"), ("exit code", str(done.returncode)),
    ] + [(f"bar: {k}", "MET" if v else "NOT MET") for k, v in bars.items()]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "nas-digits", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command,
        "wall_seconds": round(wall, 1), "exit_code": done.returncode, "bars": bars, "gap_points": round(gap_points, 3),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "summary": {k: v for k, v in summary.items() if k != "candidates"}, "candidates": summary["candidates"],
    }, indent=2))
    print(f"wrote {RESULTS}", file=sys.stderr)
    return 0 if all(bars.values()) else 3


if __name__ == "__main__":
    sys.exit(main())
