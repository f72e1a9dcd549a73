"""compactai against what users would otherwise use, on MiniLM and the digits CNN, measured in
interleaved rounds on this machine (issue 22). Run by `make bench-peers`, which builds its own
virtual environment (the peers pin other versions of shared libraries):

    flock /tmp/compactai-bench.lock build/peers-venv/bin/python benchmarks/peers.py

Contenders: compactai's chosen model (MiniLM: accuracy-aware int8 `quantize --mode auto`; digits:
`optimize --example digits` with the `make demo` budget), PyTorch fp32 eager, ONNX Runtime fp32,
ORT `quantize_dynamic` (default, per-channel), Optimum's ORTQuantizer (the CPU's preset), OpenVINO
fp32 and int8 (NNCF PTQ), and on digits Torch-Pruning's magnitude pruner at compactai's MAC
reduction. A contender that cannot be built or installed here stays in the table with its error.
Writes BENCHMARKS.md, benchmarks/results/peers.json and benchmarks/results/peers-<model>.svg.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import _peers_build as build
import numpy as np

from compactai import Context, load_example
from compactai.measure import batch_feeds, default_threads, environment, measure_latency, turn_order
from compactai.measure.memory import measure_peak_memory
from compactai.techniques import create_technique

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WORK = Path(tempfile.gettempdir()) / "compactai-bench-peers"
CORE_WATTS = 10.0  # the energy estimate's watts per busy core (compactai.measure.energy's default)
PACKAGES = ("compactai", "torch", "onnx", "onnxruntime", "openvino", "nncf", "optimum", "optimum-onnx",
            "torch-pruning", "transformers", "numpy")


def attempt(contenders: list[build.Contender], name: str, runtime: str, make: Callable[[], build.Contender]) -> None:
    """Build one contender; a failure becomes a row with its error (install or build)."""
    started = time.monotonic()
    try:
        contender = make()
    except Exception as exc:  # noqa: BLE001 (any peer failure is reported in the table, not fatal)
        line = f"{type(exc).__name__}: {str(exc).splitlines()[0][:240] if str(exc) else ''}"
        if isinstance(exc, ImportError):
            line += install_error(exc.name or "")
        print(f"  {name}: FAILED {line}\n{traceback.format_exc(limit=3)}", flush=True)
        contenders.append(build.Contender(name, runtime, error=line))
        return
    contender.notes.append(f"built in {time.monotonic() - started:.0f} s")
    contenders.append(contender)
    print(f"  {contender.name}: built", flush=True)


def install_error(module: str) -> str:
    """The last line of `make bench-peers`' pip error for the package of ``module``, if it failed."""
    package = {"optimum": "optimum-onnx", "torch_pruning": "torch-pruning"}.get(module.split(".")[0], module)
    log = Path(sys.prefix) / "install-errors" / f"{package}.txt"
    if not log.exists():
        return ""
    errors = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("ERROR")]
    return f" (pip install {package} failed here: {(errors or ['see ' + str(log)])[-1][:240]})"


def peer_contenders(out: list[build.Contender], handle: Any, task: Any, float_onnx: Any, work: Path, threads: int,
                    *, transformer: bool) -> None:
    """The peers every model is run through (after ours): PyTorch and ORT fp32, ORT's dynamic int8,
    Optimum, OpenVINO fp32 and NNCF int8 (calibrated on 64 rows of the calibration split)."""
    calibration = [dict(feeds) for feeds, _ in task.split("calibration").take(64).batches(1)]
    attempt(out, "PyTorch fp32 eager", "torch", lambda: build.torch_eager(handle, threads))
    attempt(out, "ONNX Runtime fp32", "onnxruntime", lambda: build.ort("ONNX Runtime fp32", float_onnx, threads))
    for per_channel in (False, True):
        attempt(out, f"ORT quantize_dynamic {'per-channel' if per_channel else 'default'}", "onnxruntime",
                lambda pc=per_channel: build.ort_dynamic(float_onnx, work, threads, pc))
    attempt(out, "Optimum ORTQuantizer", "onnxruntime", lambda: build.optimum_quantizer(float_onnx, work, threads))
    attempt(out, "OpenVINO fp32", "openvino", lambda: build.openvino_fp32(float_onnx, work, threads))
    attempt(out, "OpenVINO int8 (NNCF PTQ)", "openvino",
            lambda: build.openvino_int8(float_onnx, calibration, work, threads, transformer=transformer))


def minilm_contenders(threads: int, work: Path) -> tuple[list[build.Contender], Any]:
    example = load_example("minilm")
    handle, task = example.handle, example.task
    float_onnx = handle.to_onnx(work / "fp32.onnx")
    out: list[build.Contender] = []

    def ours() -> build.Contender:
        context = Context(task=task, work_dir=work / "compactai", threads=threads)
        chosen = create_technique("quantize", mode="auto", min_quality=0.99).apply(handle, context)
        return build.ort("compactai int8 auto (min 0.99)", chosen.to_onnx(work / "compactai.onnx"), threads, ours=True)

    attempt(out, "compactai int8 auto (min 0.99)", "onnxruntime", ours)
    peer_contenders(out, handle, task, float_onnx, work, threads, transformer=True)
    return out, example


def digits_contenders(threads: int, work: Path, minutes: float) -> tuple[list[build.Contender], Any]:
    from compactai.measure import count_macs
    from compactai.models.load import load_onnx

    example = load_example("digits")
    handle, task = example.handle, example.task
    float_onnx = handle.to_onnx(work / "fp32.onnx")
    out: list[build.Contender] = []
    chosen: dict[str, Any] = {}

    def ours() -> build.Contender:
        try:
            path = build.compactai_digits(work, minutes)
        except RuntimeError as exc:  # a loaded machine can leave optimize without a model in its budget
            context = Context(task=task, work_dir=work / "compactai", threads=threads)
            chosen["handle"] = create_technique("quantize", mode="auto", min_quality=0.99).apply(handle, context)
            contender = build.ort("compactai (quantize auto: optimize had no model)",
                                  chosen["handle"].to_onnx(work / "compactai.onnx"), threads, ours=True)
            contender.notes.append(f"{exc}; fell back to compactai quantize --mode auto --min-quality 0.99")
            return contender
        chosen["handle"] = load_onnx(path)
        contender = build.ort("compactai optimize (demo budget)", chosen["handle"], threads, ours=True)
        run = json.loads((path.parent / "results.json").read_text())
        # its own count, from the float graph it came from (an int8 QOperator graph's shapes do not infer)
        chosen["macs"] = ((run.get("measurements") or {}).get("onnxruntime") or {}).get("macs")
        if run.get("budget_met") is False:  # exit 3: model.onnx is the closest candidate, not a chosen one
            recipe = (run.get("closest") or {}).get("recipe", [])
            contender.notes.append("optimize met no candidate within the demo budget (exit 3); this is its closest")
        else:
            recipe = run.get("recipe", [])
        contender.notes.append("recipe: " + (" -> ".join(step["technique"] for step in recipe) or "the original"))
        return contender

    attempt(out, "compactai optimize (demo budget)", "onnxruntime", ours)
    peer_contenders(out, handle, task, float_onnx, work, threads, transformer=False)
    original_macs = count_macs(float_onnx) or 1
    ratio = ((chosen.get("macs") or count_macs(chosen["handle"]) or original_macs) / original_macs
             if "handle" in chosen else 0.5)
    target = ratio if ratio < 0.95 else 0.5

    def magnitude() -> build.Contender:
        contender = build.torch_pruning_magnitude(handle, task, target, work, threads)
        if ratio >= 0.95:
            contender.notes.append("compactai's model keeps its MACs (no pruning), so the pruner targets 0.5x")
        return contender

    attempt(out, "Torch-Pruning magnitude + fine-tune", "onnxruntime", magnitude)
    return out, example


def quality(contender: build.Contender, task: Any) -> dict[str, float]:
    value = task.evaluate(contender.runner.run)
    return {"value": value.value, **{k: v for k, v in value.details.items() if k != "samples"}}


def measure_all(contenders: list[build.Contender], example: Any, rounds: int) -> dict[str, dict[str, Any]]:
    """Batch-1 latency, batch-32 throughput and CPU time, in ``rounds`` interleaved rounds."""
    live = [c for c in contenders if c.error is None]
    single = {k: v[:1] for k, v in example.handle.example_inputs.items()}
    batch = batch_feeds(single, 32)
    seen: dict[str, dict[str, list[float]]] = {c.name: {"p50": [], "p90": [], "tput": [], "cpu": []} for c in live}
    for round_number in range(rounds):
        print(f"  round {round_number + 1}/{rounds}", flush=True)
        for index in turn_order(len(live), round_number):
            contender = live[index]
            one = measure_latency(contender.runner, single, min_queries=40, min_seconds=0.4, warmup=5)
            many = measure_latency(contender.runner, batch, min_queries=4, min_seconds=0.4, warmup=1)
            figures = seen[contender.name]
            figures["p50"].append(one.p50_ms)
            figures["p90"].append(one.p90_ms)
            figures["tput"].append(32 / (many.mean_ms / 1e3))
            figures["cpu"].append(one.cpu_seconds / one.queries)
    return {name: {"latency_p50_ms": statistics.median(f["p50"]), "latency_p90_ms": statistics.median(f["p90"]),
                   "throughput_b32_per_s": statistics.median(f["tput"]),
                   "energy_mj": statistics.median(f["cpu"]) * CORE_WATTS * 1e3,
                   "rounds_p50_ms": [round(x, 4) for x in f["p50"]]} for name, f in seen.items()}


def peak_memory(contender: build.Contender, threads: int, example: Any) -> float | None:
    if contender.handle is not None:
        stats = measure_peak_memory(contender.handle, contender.runtime, threads)
        return stats.peak_mb if stats else None
    import subprocess

    inputs = WORK / "probe_inputs.npz"
    np.savez(inputs, allow_pickle=False, **{k: v[:1] for k, v in example.handle.example_inputs.items()})
    probe = ROOT / "benchmarks" / "_peers_probe.py"
    done = subprocess.run([sys.executable, str(probe), str(contender.files[0]), str(inputs), str(threads)],
                          capture_output=True, text=True, timeout=600, check=False)
    return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else None


def pareto_check(rows: list[dict[str, Any]], quality_key: str, perf_key: str, higher: bool) -> dict[str, Any]:
    """Is compactai's row on the Pareto front of (quality up, perf up/down) against every measured peer?"""
    ours = next((r for r in rows if r["ours"] and r.get(perf_key) is not None), None)
    if ours is None:
        return {"on_front": None, "dominated_by": [], "axes": [quality_key, perf_key]}

    def better_or_equal(a: float, b: float) -> bool:
        return a >= b if higher else a <= b

    dominated_by = [r["name"] for r in rows if r is not ours and r.get(perf_key) is not None
                    and r[quality_key] >= ours[quality_key] and better_or_equal(r[perf_key], ours[perf_key])
                    and (r[quality_key] > ours[quality_key] or r[perf_key] != ours[perf_key])]
    return {"on_front": not dominated_by, "dominated_by": dominated_by, "axes": [quality_key, perf_key]}


def run_model(name: str, threads: int, rounds: int, minutes: float) -> dict[str, Any]:
    work = WORK / name
    shutil.rmtree(work, ignore_errors=True)  # this script's own scratch: a previous run's optimize study
    work.mkdir(parents=True)                 # would make `optimize -o` refuse the directory
    print(f"{name}: building contenders", flush=True)
    contenders, example = (minilm_contenders(threads, work) if name == "minilm"
                           else digits_contenders(threads, work, minutes))
    print(f"{name}: quality", flush=True)
    rows: list[dict[str, Any]] = []
    for c in contenders:
        row: dict[str, Any] = {"name": c.name, "runtime": c.runtime, "ours": c.ours, "error": c.error, "notes": c.notes}
        if c.error is None:
            try:
                row["quality"] = quality(c, example.task)
            except Exception as exc:  # noqa: BLE001 (reported in the table)
                row["error"] = c.error = f"quality run failed: {type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
    print(f"{name}: latency and throughput in {rounds} interleaved rounds", flush=True)
    timed = measure_all(contenders, example, rounds)
    for c, row in zip(contenders, rows):
        if c.error is not None:
            continue
        row.update(timed[c.name])
        row["size_mb"] = sum(f.stat().st_size for f in c.files) / 1e6 if c.files else _torch_mb(c)
        row["peak_memory_mb"] = peak_memory(c, threads, example)
    measured = [r for r in rows if r.get("latency_p50_ms") is not None]
    key = "cosine_min" if name == "minilm" else "accuracy"
    for r in measured:
        r[key] = r["quality"][key] if key in r["quality"] else r["quality"]["value"]
    fronts = {"latency": pareto_check(measured, key, "latency_p50_ms", higher=False)}
    if name == "minilm":
        fronts["throughput"] = pareto_check(measured, key, "throughput_b32_per_s", higher=True)
    return {"rows": rows, "quality_key": key, "pareto": fronts}


def _torch_mb(contender: build.Contender) -> float | None:
    module = contender.handle.module if contender.handle is not None else None
    if module is None:
        return None
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 1e6


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def main() -> None:
    import _peers_report as report

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["minilm", "digits"], action="append")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--optimize-minutes", type=float, default=2.5)
    parser.add_argument("--markdown", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    threads = default_threads()
    started = time.monotonic()
    results: dict[str, Any] = {"created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": threads,
                               "environment": environment(), "versions": versions(),
                               "load_average_start": list(os.getloadavg()), "models": {}}
    for name in args.only or ["minilm", "digits"]:
        results["models"][name] = run_model(name, threads, args.rounds, args.optimize_minutes)
    results["load_average_end"] = list(os.getloadavg())
    results["seconds"] = time.monotonic() - started
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "peers.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    report.write(results, args.markdown, RESULTS)
    print(f"wrote {args.markdown} and {RESULTS / 'peers.json'} in {results['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
