"""NAS benchmark (issue 21), MiniLM: an encoder found by `compactai nas --space encoder` (each
candidate distilled from all-MiniLM-L6-v2) must beat the hand-picked 3-layer student of the
distillation benchmark (layers 0,2,5: test mean cosine 0.927 in benchmarks/results/distillation.json)
with a higher test mean cosine at equal or lower measured batch-1 latency, within 30 minutes.

The latency budget is 0.95 of the hand-picked student's own p90 (``--budget latency_p90_ms<=0.95x
--relative-to student``): the CLI measures that student interleaved with the teacher, and times each
candidate interleaved with it, so a machine that is slower or faster during the run changes both
sides alike (a ratio to the teacher was tried first: the teacher's p90 moved from 1.5x to 1.9x the
student's within one run). The search runs as the real CLI in a subprocess with ``--compare-student layers:0,2,5``, so
its final interleaved re-measurement puts the chosen student and the hand-picked one side by side.
The 30 minutes are wall time on a shared 2-core machine: the load average is recorded.

Run (one benchmark at a time):
    flock /tmp/compactai-bench.lock nice -n -10 .venv/bin/python benchmarks/nas.py --model minilm
Prints a table and writes the ``minilm`` section of benchmarks/results/nas_minilm.json.
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

RESULTS = Path(__file__).parent / "results" / "nas_minilm.json"
DISTILLATION = Path(__file__).parent / "results" / "distillation.json"
ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "layers:0,2,5"


def reference_cosine() -> float:
    """The hand-picked student's test mean cosine, from the distillation benchmark's results."""
    rows = json.loads(DISTILLATION.read_text())["minilm"]["rows"]
    return float(next(r for r in rows if r["model"] == "distilled layers 0,2,5")["cosine_mean"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-minutes", type=float, default=24.0, help="the search's own limit (the bar is 30)")
    parser.add_argument("--max-trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--budget-factor", type=float, default=0.95,
                        help="the search's p90 budget as a fraction of the hand-picked student's p90: below 1 so that "
                             "the chosen student is faster than it beyond measurement noise, not equal to it")
    parser.add_argument("--space", type=Path, default=Path(__file__).parent / "nas_minilm_space.json")
    parser.add_argument("--out", type=Path, default=Path("/tmp/compactai-bench-nas-minilm"))
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)  # a fresh output directory: nothing of an earlier run is resumed
    load_before = os.getloadavg()
    started = time.monotonic()
    command = [sys.executable, "-m", "compactai.cli", "nas", "--example", "minilm", "--space", str(args.space),
               # relative to the hand-picked student: the search times every candidate interleaved with it
               "--budget", f"latency_p90_ms<={args.budget_factor:g}x", "--relative-to", "student",
               "--compare-student", REFERENCE,
               "--max-minutes", str(args.max_minutes), "--max-trials", str(args.max_trials), "--epochs",
               str(args.epochs), "--reduction-factor", str(args.reduction_factor), "-o", str(args.out), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.monotonic() - started
    if not done.stdout.strip():
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    summary = json.loads(done.stdout)
    remeasured = summary["remeasure"]
    chosen, reference = remeasured["chosen"], remeasured["reference"]
    cosine, target = summary["test"]["student"], reference_cosine()
    bars = {
        "higher_test_cosine_than_hand_picked": cosine > target,
        "p90_at_most_hand_picked": chosen["latency_p90_ms"] <= reference["latency_p90_ms"],
        "p50_at_most_hand_picked": chosen["latency_p50_ms"] <= reference["latency_p50_ms"],
        "under_30_minutes": wall < 30 * 60,
    }
    rows = [
        ("chosen", summary["chosen"]["label"] + f" teacher layers {summary['chosen']['teacher_layers']}"),
        ("chosen test mean cosine", f"{cosine:.4f}"), ("hand-picked 0,2,5 test mean cosine", f"{target:.4f}"),
        ("chosen p50 / p90 (ms, interleaved)", f"{chosen['latency_p50_ms']:.3f} / {chosen['latency_p90_ms']:.3f}"),
        ("hand-picked p50 / p90 (ms)", f"{reference['latency_p50_ms']:.3f} / {reference['latency_p90_ms']:.3f}"),
        ("teacher p50 / p90 (ms)", f"{remeasured['teacher']['latency_p50_ms']:.3f} / "
                                   f"{remeasured['teacher']['latency_p90_ms']:.3f}"),
        ("budget p90 (ms)", f"{summary['budget_ms']:.3f}"), ("candidates", json.dumps(summary["counts"])),
        ("fidelity schedule", json.dumps(summary["fidelity_schedule"])), ("search stopped by", summary["stopped_by"]),
        ("wall time (s)", f"{wall:.0f}"), ("exit code", str(done.returncode)),
        ("load average before / after", f"{load_before} / {os.getloadavg()}"),
    ] + [(f"bar: {k}", "MET" if v else "NOT MET") for k, v in bars.items()]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    write_section(RESULTS, "minilm", {
        "benchmark": "nas-minilm", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command,
        "wall_seconds": round(wall, 1), "exit_code": done.returncode, "bars": bars,
        "hand_picked_cosine_mean": target, "budget_factor": args.budget_factor, "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "summary": {k: v for k, v in summary.items() if k != "candidates"}, "candidates": summary["candidates"],
    })
    print(f"wrote {RESULTS}", file=sys.stderr)
    return 0 if all(bars.values()) else 3


if __name__ == "__main__":
    sys.exit(main())
