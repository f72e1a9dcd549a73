"""Pruning benchmark (issue 4): every speed and size figure measured on ONNX Runtime / PyTorch.

1. digits CNN, structured, 50% of MACs removed, fine-tuned: accuracy drop, ORT batch-1 and
   batch-256 latency next to the MAC ratio.
2. MiniLM, 50% of FFN neurons removed: size, latency, fidelity right after pruning and after a
   short fine-tune (embedding loss to the unpruned model).
3. digits CNN, unstructured 80% sparsity, fine-tuned: real zero fraction, accuracy, gzip size,
   and the dense speed-up (absent).
4. MiniLM, 5/10/20% of FFN neurons, no fine-tuning: validation fidelity with and without
   least-squares reconstruction (l2 and fluctuation criteria), ORT batch-1 and batch-32 latency
   of the pruned and unpruned models, measured in interleaved rounds.
5. MiniLM, pruning as a second stage before dynamic int8 (what `compactai optimize` searches):
   FFN neurons or attention heads removed with reconstruction, then int8; fidelity to the fp32
   model before and after int8, against the quantization fidelity bar (validation cosine
   min >= 0.99, mean >= 0.997), and batch-1 latency paired with int8 alone in interleaved rounds.

Run:  .venv/bin/python benchmarks/pruning.py [--quick] [--only digits,minilm,sparse,reconstruct,second_stage]
Latency measurements take /tmp/compactai-bench.lock so only one benchmark measures at a time;
when the caller already holds it (flock /tmp/compactai-bench.lock ... --lock-held), they don't.
Writes benchmarks/results/pruning.json, keeping the cases of earlier runs that were not re-run.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import compactai
from compactai.measure import (
    MeasureConfig,
    batch_feeds,
    count_macs,
    environment,
    make_runner,
    measure,
    measure_latency,
    turn_order,
)
from compactai.results import to_jsonable
from compactai.techniques import Context, create_technique
from compactai.techniques.prune import compressed_size

RESULTS = Path(__file__).parent / "results" / "pruning.json"
LOCK = "/tmp/compactai-bench.lock"
LOCK_HELD = False  # --lock-held: the caller runs this script under flock LOCK (taking it again would deadlock)


@contextlib.contextmanager
def bench_lock() -> Iterator[None]:
    if LOCK_HELD:
        yield
        return
    with open(LOCK, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def figures(handles: dict[str, Any], task: Any, big_batch: int | None, quick: bool) -> dict[str, dict[str, Any]]:
    """Each model's quality (outside the lock), then every latency figure of all models back to back
    under one lock, runtime by runtime, so that they share the machine's load at that moment."""
    config = MeasureConfig(min_queries=60 if quick else 200, min_seconds=0.5 if quick else 2.0, warmup=20,
                           memory=False, energy=False, quality=False)
    # PyTorch eager is the secondary runtime here: fewer queries keep the run short on a shared machine
    torch_config = MeasureConfig(min_queries=20 if quick else 50, min_seconds=0.5 if quick else 1.0, warmup=5,
                                 memory=False, energy=False, quality=False, throughput_min_batches=2)
    results: dict[str, dict[str, Any]] = {}
    for label, handle in handles.items():
        onnx_handle = handle.to_onnx()
        results[label] = {"quality": task.evaluate(make_runner(onnx_handle, "onnxruntime")).to_dict(),
                          "gzip_mb": compressed_size(onnx_handle.path) / 1e6}
    with bench_lock():
        for label, handle in handles.items():
            ort = measure(handle, None, runtime="onnxruntime", config=config)
            results[label].update({"macs": ort.macs, "size_mb": ort.size_mb, "ort_p50_ms": ort.latency_p50_ms,
                                   "ort_p90_ms": ort.latency_p90_ms, "ort_throughput": ort.throughput_items_per_s})
        for label, handle in handles.items():
            if big_batch:
                runner = make_runner(handle.to_onnx(), "onnxruntime")
                single = {k: v[:1] for k, v in handle.example_inputs.items()}
                stats = measure_latency(runner, batch_feeds(single, big_batch), min_queries=8 if quick else 30,
                                        min_seconds=1.0 if quick else 4.0, warmup=3)
                results[label][f"ort_b{big_batch}_p50_ms"] = stats.p50_ms
        for label, handle in handles.items():
            eager = measure(handle, None, runtime="torch", config=torch_config)
            results[label].update({"params": eager.params, "torch_p50_ms": eager.latency_p50_ms,
                                   "torch_p90_ms": eager.latency_p90_ms})
    return results


def compare(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Ratios baseline / pruned (> 1 = smaller or faster)."""
    out = {}
    for key in ("params", "macs", "size_mb", "gzip_mb", "ort_p50_ms", "ort_p90_ms", "torch_p50_ms", "torch_p90_ms",
                "ort_b256_p50_ms"):
        if base.get(key) and new.get(key):
            out[key] = base[key] / new[key]
    return out


def run_technique(name: str, handle: Any, task: Any, **params: Any) -> tuple[Any, dict[str, Any], float]:
    started = time.monotonic()
    result = create_technique(name, **params).apply(handle, Context(task=task, progress=lambda m: print("  ", m)))
    return result, result.metadata["history"][-1]["decisions"], time.monotonic() - started


def digits_structured(quick: bool) -> dict[str, Any]:
    example = compactai.load_example("digits")
    pruned, decisions, seconds = run_technique(
        "structured_prune", example.handle, example.task, ratio=0.5, target="macs", criterion="l2",
        finetune_epochs=1 if quick else 4, kd_weight=0.5, lr=1e-3, max_batches=4 if quick else None,
    )
    measured = figures({"baseline": example.handle, "pruned": pruned}, example.task, 256, quick)
    base, new = measured["baseline"], measured["pruned"]
    return {"name": "digits structured, 50% of MACs, fine-tuned", "baseline": base, "pruned": new,
            "ratios": compare(base, new), "seconds": seconds,
            "decisions": {k: v for k, v in decisions.items() if k != "history"},
            "accuracy_drop_points": 100 * (base["quality"]["value"] - new["quality"]["value"])}


def digits_unstructured(quick: bool) -> dict[str, Any]:
    example = compactai.load_example("digits")
    sparse, decisions, seconds = run_technique(
        "unstructured_prune", example.handle, example.task, ratio=0.8, ranking="global", steps=2,
        finetune_epochs=1, kd_weight=0.5, max_batches=4 if quick else 10,
    )
    measured = figures({"baseline": example.handle, "pruned": sparse}, example.task, 256, quick)
    base, new = measured["baseline"], measured["pruned"]
    return {"name": "digits unstructured 80%, fine-tuned", "baseline": base, "pruned": new,
            "ratios": compare(base, new), "seconds": seconds,
            "decisions": {k: v for k, v in decisions.items() if k != "per_layer_sparsity"},
            "accuracy_drop_points": 100 * (base["quality"]["value"] - new["quality"]["value"])}


def minilm_ffn(quick: bool) -> dict[str, Any]:
    example = compactai.load_example("minilm")
    pruned, decisions, seconds = run_technique(
        "structured_prune", example.handle, example.task, ratio=0.5, target="channels", scope="ffn",
        criterion="l2")
    tuned, tune_decisions, tune_seconds = run_technique(
        "structured_prune", example.handle, example.task, ratio=0.5, target="channels", scope="ffn",
        criterion="l2", finetune_epochs=1, lr=1e-4, batch_size=32, max_batches=5 if quick else 80)
    measured = figures({"baseline": example.handle, "pruned": pruned, "tuned": tuned}, example.task, None, quick)
    base, right_after, after_tune = measured["baseline"], measured["pruned"], measured["tuned"]
    return {"name": "minilm, 50% of FFN neurons", "baseline": base, "pruned": right_after,
            "pruned_finetuned": after_tune, "ratios": compare(base, right_after), "seconds": seconds,
            "finetune": tune_decisions["steps"][0].get("finetune"), "finetune_seconds": tune_seconds,
            "decisions": {k: v for k, v in decisions.items() if k != "history"}}


def interleaved_latency(handles: dict[str, Any], batches: tuple[int, ...], rounds: int, quick: bool
                        ) -> dict[str, dict[str, Any]]:
    """ORT p50/p90 per model and batch size, measured in ``rounds`` rounds that visit every model in
    turn (load that comes and goes on a shared machine then hits all models alike); per model and
    batch the median over rounds, and each round's p50."""
    runners = {label: make_runner(handle.to_onnx(), "onnxruntime") for label, handle in handles.items()}
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {}
    with bench_lock():
        labels = list(handles)
        for round_number in range(rounds):
            for batch in batches:
                for label in (labels[i] for i in turn_order(len(labels), round_number)):
                    handle = handles[label]
                    single = {k: v[:1] for k, v in handle.example_inputs.items()}
                    feeds = batch_feeds(single, batch) if batch > 1 else single
                    stats = measure_latency(runners[label], feeds, min_queries=(50 if quick else 200) // batch + 5,
                                            min_seconds=0.3 if quick else 1.0, warmup=5)
                    samples.setdefault((label, batch), []).append((stats.p50_ms, stats.p90_ms))
    result: dict[str, dict[str, Any]] = {label: {} for label in handles}
    for (label, batch), values in samples.items():
        result[label][f"ort_b{batch}_p50_ms"] = statistics.median(v[0] for v in values)
        result[label][f"ort_b{batch}_p90_ms"] = statistics.median(v[1] for v in values)
        result[label][f"ort_b{batch}_p50_rounds_ms"] = [v[0] for v in values]
    return result


def minilm_reconstruct(quick: bool) -> dict[str, Any]:
    """Light FFN pruning without fine-tuning: plain vs least-squares reconstruction, per ratio."""
    example = compactai.load_example("minilm")
    handle, task = example.handle, example.task
    ratios = (0.1,) if quick else (0.05, 0.1, 0.2)
    variants = (("l2", False), ("l2", True), ("fluctuation", False), ("fluctuation", True))
    rows, latency_models = [], {"baseline": handle}
    for ratio in ratios:
        for criterion, reconstruct in variants:
            pruned, decisions, seconds = run_technique(
                "structured_prune", handle, task, ratio=ratio, target="channels", scope="ffn", criterion=criterion,
                reconstruct=reconstruct, reconstruct_samples=256 if quick else 1024)
            quality = task.evaluate(make_runner(pruned, "onnxruntime"), split="validation").details
            fits = decisions["steps"][0].get("reconstruction") or []
            rows.append({"ratio": ratio, "criterion": criterion, "reconstruct": reconstruct, "seconds": seconds,
                         "cosine_min": quality["cosine_min"], "cosine_mean": quality["cosine_mean"],
                         "knn_overlap": quality["knn_overlap"], "params": decisions["after"]["params"],
                         "fits": fits})
            print(f"  ratio {ratio} {criterion} reconstruct={reconstruct}: cosine_min {quality['cosine_min']:.4f} "
                  f"mean {quality['cosine_mean']:.4f} ({seconds:.0f} s)")
            if criterion == "fluctuation" and reconstruct:
                # every variant of a ratio has the same shapes, so one of them stands for its latency
                latency_models[f"ffn -{ratio:.0%}"] = pruned
    load_before = os.getloadavg()[0]
    latency = interleaved_latency(latency_models, (1, 32), 3 if quick else 8, quick)
    for label, model in latency_models.items():
        latency[label]["macs"] = count_macs(model)
        for batch in (1, 32):  # speed-up within each round, where baseline and model shared the same load
            key = f"ort_b{batch}_p50_rounds_ms"
            paired = [b / m for b, m in zip(latency["baseline"][key], latency[label][key])]
            latency[label][f"ort_b{batch}_speedup"] = statistics.median(paired)
            latency[label][f"ort_b{batch}_speedup_range"] = [min(paired), max(paired)]
    base_quality = task.evaluate(make_runner(handle, "onnxruntime"), split="validation").details
    return {"name": "minilm, 5/10/20% of FFN neurons, no fine-tuning: least-squares reconstruction",
            "split": "validation", "environment": environment(), "quick": quick, "rows": rows,
            "latency": latency, "baseline_quality": base_quality,
            "load_average_1min": {"before_latency": load_before, "after_latency": os.getloadavg()[0]}}


FIDELITY_BAR = {"cosine_min": 0.99, "cosine_mean": 0.997}  # the quantization issue's bar


def minilm_second_stage(quick: bool) -> dict[str, Any]:
    """Does any pruning stage before int8 keep the fidelity bar and beat int8 alone on speed?"""
    example = compactai.load_example("minilm")
    handle, task = example.handle, example.task
    stages = [("ffn", 0.03), ("ffn", 0.05), ("ffn", 0.1), ("heads", 0.05), ("heads", 0.1)]
    if quick:
        stages = [("ffn", 0.05), ("heads", 0.05)]
    int8 = {"mode": "dynamic", "per_channel": True}
    quantized, _, seconds = run_technique("quantize", handle, task, **int8)
    rows = [{"pipeline": "int8 alone", "seconds": seconds,
             "int8": task.evaluate(make_runner(quantized, "onnxruntime"), split="validation").details}]
    models = {"int8 alone": quantized}
    for scope, ratio in stages:
        label = f"{scope} -{ratio:.0%} -> int8"
        pruned, decisions, seconds = run_technique(
            "structured_prune", handle, task, ratio=ratio, target="channels", scope=scope, ranking="global",
            criterion="fluctuation", reconstruct=True, reconstruct_samples=256 if quick else 1024)
        both, _, more = run_technique("quantize", pruned, task, **int8)
        rows.append({"pipeline": label, "seconds": seconds + more, "removed": sum(e["count"] for e in
                                                                                   decisions["history"]),
                     "float": task.evaluate(make_runner(pruned, "onnxruntime"), split="validation").details,
                     "int8": task.evaluate(make_runner(both, "onnxruntime"), split="validation").details})
        models[label] = both
        print(f"  {label}: float cosine_min {rows[-1]['float']['cosine_min']:.4f}, int8 "
              f"{rows[-1]['int8']['cosine_min']:.4f} / {rows[-1]['int8']['cosine_mean']:.4f}")
    latency = interleaved_latency(models, (1,), 3 if quick else 8, quick)
    for row in rows:
        timing = latency[row["pipeline"]]
        paired = [q / m for q, m in zip(latency["int8 alone"]["ort_b1_p50_rounds_ms"], timing["ort_b1_p50_rounds_ms"])]
        row.update(ort_b1_p50_ms=timing["ort_b1_p50_ms"], ort_b1_p90_ms=timing["ort_b1_p90_ms"],
                   speedup_vs_int8=statistics.median(paired), speedup_range=[min(paired), max(paired)],
                   meets_bar=all(row["int8"][k] >= v for k, v in FIDELITY_BAR.items()))
    return {"name": "minilm, pruning + reconstruction before dynamic int8 (per-channel), against int8 alone",
            "split": "validation", "bar": FIDELITY_BAR, "environment": environment(), "quick": quick,
            "rows": rows}


def print_second_stage(case: dict[str, Any]) -> None:
    print(f"\n## {case['name']}")
    print("| pipeline | float cos min | int8 cos min | int8 cos mean | meets bar | ORT b1 p50 ms | "
          "speed-up vs int8 alone (range) |")
    print("|---|---|---|---|---|---|---|")
    for row in case["rows"]:
        low, high = row["speedup_range"]
        floating = f"{row['float']['cosine_min']:.4f}" if "float" in row else "-"
        print(f"| {row['pipeline']} | {floating} | {row['int8']['cosine_min']:.4f} | {row['int8']['cosine_mean']:.4f} "
              f"| {'yes' if row['meets_bar'] else 'no'} | {row['ort_b1_p50_ms']:.2f} | "
              f"{row['speedup_vs_int8']:.2f}x ({low:.2f}-{high:.2f}) |")


def print_reconstruct(case: dict[str, Any]) -> None:
    latency = case["latency"]
    print(f"\n## {case['name']}")
    print("| FFN removed | criterion | reconstruct | cosine_min | cosine_mean | 10-NN overlap | seconds |")
    print("|---|---|---|---|---|---|---|")
    for row in case["rows"]:
        print(f"| {row['ratio']:.0%} | {row['criterion']} | {'yes' if row['reconstruct'] else 'no'} | "
              f"{row['cosine_min']:.4f} | {row['cosine_mean']:.4f} | {row['knn_overlap']:.3f} | {row['seconds']:.0f} |")
    print("\n| model | MACs | ORT p50 b1 ms | speed-up b1 (range over rounds) | ORT p50 b32 ms | speed-up b32 |")
    print("|---|---|---|---|---|---|")

    def speedup(row: dict[str, Any], batch: int) -> str:
        low, high = row[f"ort_b{batch}_speedup_range"]
        return f"{row[f'ort_b{batch}_speedup']:.2f}x ({low:.2f}-{high:.2f})"

    for label, row in latency.items():
        print(f"| {label} | {fmt(row['macs'])} | {row['ort_b1_p50_ms']:.2f} | {speedup(row, 1)} | "
              f"{row['ort_b32_p50_ms']:.1f} | {speedup(row, 32)} |")
    print(f"load average (1 min) around the latency rounds: {case['load_average_1min']}")


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_case(case: dict[str, Any]) -> None:
    columns = [("baseline", case["baseline"]), ("pruned", case["pruned"])]
    if "pruned_finetuned" in case:
        columns.append(("pruned+finetune", case["pruned_finetuned"]))
    rows = [("params", "params"), ("MACs", "macs"), ("ONNX MB", "size_mb"), ("gzip MB", "gzip_mb"),
            ("ORT p50 ms (b1)", "ort_p50_ms"), ("ORT p90 ms (b1)", "ort_p90_ms"),
            ("ORT p50 ms (b256)", "ort_b256_p50_ms"), ("torch p50 ms (b1)", "torch_p50_ms"),
            ("torch p90 ms (b1)", "torch_p90_ms")]
    print(f"\n## {case['name']}")
    print(f"| figure | {' | '.join(c for c, _ in columns)} | baseline/pruned |")
    print("|---" * (len(columns) + 2) + "|")
    for label, key in rows:
        if case["baseline"].get(key) is None:
            continue
        ratio = case["ratios"].get(key)
        print(f"| {label} | {' | '.join(fmt(col.get(key)) for _, col in columns)} | "
              f"{fmt(ratio, 2) + 'x' if ratio else '-'} |")
    quality = [col["quality"] for _, col in columns]
    print(f"| quality ({quality[0]['metric']}) | {' | '.join(fmt(q['value'], 4) for q in quality)} | |")
    for extra in ("cosine_mean", "knn_overlap"):
        if extra in quality[0]["details"]:
            print(f"| {extra} | {' | '.join(fmt(q['details'][extra], 4) for q in quality)} | |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Few queries and fine-tune batches (smoke run).")
    parser.add_argument("--only", default="digits,sparse,minilm,reconstruct,second_stage")
    parser.add_argument("--lock-held", action="store_true", help=f"The caller holds {LOCK} (flock ... python "
                        "benchmarks/pruning.py --lock-held): measure without taking it again.")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]
    global LOCK_HELD  # noqa: PLW0603 (a command-line switch read by the timing helper)
    LOCK_HELD = args.lock_held
    wanted = args.only.split(",")
    cases = {"digits": digits_structured, "sparse": digits_unstructured, "minilm": minilm_ffn,
             "reconstruct": minilm_reconstruct, "second_stage": minilm_second_stage}
    # the load when this run started and ended, so that latency noise on a shared machine is visible
    results: dict[str, Any] = {"environment": environment(), "quick": args.quick, "cases": {},
                               "load_average_start": os.getloadavg()}
    if RESULTS.exists():  # cases not re-run keep their earlier figures
        results["cases"] = json.loads(RESULTS.read_text()).get("cases", {})
    for name, run in cases.items():
        if name in wanted:
            print(f"running {name} ...", file=sys.stderr)
            results["cases"][name] = case = run(args.quick)
            if name == "reconstruct":
                print_reconstruct(case)
            elif name == "second_stage":
                print_second_stage(case)
            else:
                print_case(case)
            save(results)  # after every case: a long run keeps what it measured
    summary = []
    if "digits" in results["cases"]:
        case = results["cases"]["digits"]
        r = case["ratios"]
        summary.append(f"digits structured: MACs {r['macs']:.2f}x fewer -> ORT b1 p50 {r['ort_p50_ms']:.2f}x, "
                       f"b256 p50 {r['ort_b256_p50_ms']:.2f}x faster; accuracy drop "
                       f"{case['accuracy_drop_points']:.2f} points")
    if "sparse" in results["cases"]:
        case = results["cases"]["sparse"]
        r = case["ratios"]
        summary.append(f"digits unstructured: zero fraction {case['decisions']['zero_fraction']:.1%} of sparsified "
                       f"weights; gzip {r['gzip_mb']:.2f}x smaller; dense ORT b1 p50 {r['ort_p50_ms']:.2f}x, b256 "
                       f"{r['ort_b256_p50_ms']:.2f}x (no real speed-up expected: dense kernels); accuracy drop "
                       f"{case['accuracy_drop_points']:.2f} points")
    if "minilm" in results["cases"]:
        case = results["cases"]["minilm"]
        r = case["ratios"]
        summary.append(
            f"minilm FFN 50%: params {r['params']:.2f}x fewer, ORT b1 p50 {r['ort_p50_ms']:.2f}x faster; "
            f"cosine_mean {case['pruned']['quality']['details']['cosine_mean']:.3f} -> "
            f"{case['pruned_finetuned']['quality']['details']['cosine_mean']:.3f} after "
            f"{case['finetune_seconds']:.0f} s of pruning + fine-tuning")
    if "reconstruct" in results["cases"]:
        case = results["cases"]["reconstruct"]
        for ratio in sorted({row["ratio"] for row in case["rows"]}):
            plain = next(r for r in case["rows"] if r["ratio"] == ratio and r["criterion"] == "l2"
                         and not r["reconstruct"])
            best = max((r for r in case["rows"] if r["ratio"] == ratio), key=lambda r: r["cosine_min"])
            timing = case["latency"].get(f"ffn -{ratio:.0%}")
            speed = (f"; ORT speed-up b1 {timing['ort_b1_speedup']:.2f}x, b32 {timing['ort_b32_speedup']:.2f}x "
                     "(median of paired rounds)" if timing else "")
            summary.append(f"minilm FFN {ratio:.0%}, no fine-tuning: cosine_min {plain['cosine_min']:.3f} (l2) -> "
                           f"{best['cosine_min']:.3f} ({best['criterion']}"
                           f"{' + reconstruction' if best['reconstruct'] else ''}){speed}")
    if "second_stage" in results["cases"]:
        rows = results["cases"]["second_stage"]["rows"]
        # faster = faster than int8 alone in every paired round, not only in the median
        faster = [r for r in rows[1:] if r["meets_bar"] and r["speedup_range"][0] > 1]
        summary.append("minilm prune -> int8 against int8 alone: " + "; ".join(
            f"{r['pipeline']} cosine {r['int8']['cosine_min']:.4f} / {r['int8']['cosine_mean']:.4f} "
            f"({'meets' if r['meets_bar'] else 'misses'} the bar), {r['speedup_vs_int8']:.2f}x" for r in rows[1:])
            + f" -> {len(faster)} pipeline(s) keep the bar and are faster in every round")
    print("\n## Summary")
    for line in summary:
        print(f"- {line}")
    results["summary"] = summary
    results["load_average_end"] = os.getloadavg()
    save(results)
    print(f"\nwrote {RESULTS}")
    return 0


def save(results: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(to_jsonable(results), indent=2))


if __name__ == "__main__":
    sys.exit(main())
