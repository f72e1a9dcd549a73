"""Runtimes on this machine (issue 18): the digits CNN and MiniLM on ONNX Runtime, OpenVINO, LiteRT
and ExecuTorch, fp32 and the int8 each runtime's tool makes (compactai's ONNX int8 on ONNX Runtime,
NNCF's on OpenVINO, the PT2E flow with litert-torch's quantizer / XNNPACKQuantizer on LiteRT /
ExecuTorch): size, quality, batch-1 p50 and batch-32 throughput, all measured in ONE run in
interleaved rounds (compactai.measure's turn_order), so load that comes and goes on a shared
machine hits every candidate alike. Run it under the benchmark lock:

    flock /tmp/compactai-bench.lock nice -n -10 .venv/bin/python benchmarks/runtimes.py --quick

Inputs are real: the first 64 rows of each task's evaluation split (MiniLM padded to their
longest sentence, the sequence length the .tflite/.pte are converted for); batch 1 is its first
row, batch 32 its first 32 rows. Parity of each candidate against the torch source is computed
on the same 64 rows; quality is the task's metric on its evaluation split (digits: test accuracy)
or, for MiniLM, the sentence-embedding cosine min to torch on those 64 rows. A runtime whose venv or extra is missing is listed as skipped with the reason.
Conversions are cached under the system temp dir (--fresh converts again; --convert-only fills the
cache without timing, outside the lock). LiteRT and ExecuTorch
run in a worker process in their venv and are timed inside it (docs/runtimes.md). Prints a table
and writes benchmarks/results/runtimes.json.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from compactai import Context, load_example
from compactai.errors import CompactAIError
from compactai.measure import (
    environment,
    make_runner,
    measure_latency,
    measure_throughput,
    runtime_plugin,
    turn_order,
)
from compactai.measure.openvino import load_openvino, parity_feeds, parity_figures, reference_outputs
from compactai.models.handle import ModelHandle
from compactai.tasks import mean_pool, normalize
from compactai.techniques import create_technique

RESULTS = Path(__file__).parent / "results" / "runtimes.json"
WORK = Path(tempfile.gettempdir()) / "compactai-bench-runtimes"  # models are large: keep them out of the repo
BATCH = 32
console = Console(width=150)


@dataclass
class Candidate:
    model: str
    runtime: str
    precision: str
    made_by: str
    single: ModelHandle | None = None  # the file timed at batch 1
    batched: ModelHandle | None = None  # the file timed at batch 32 (a .tflite has one batch size)
    error: str | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    samples: list[tuple[float, float]] = field(default_factory=list)


def cached(path: Path, make: Any, load: Any) -> ModelHandle:
    """``load(path)`` when a previous run converted it, else ``make()`` (which writes ``path``)."""
    return load(path) if path.is_file() else make()


def build(name: str, fresh: bool) -> tuple[list[Candidate], dict[str, Any]]:
    example = load_example(name)
    source, task = example.handle, example.task
    work = WORK / f"{name}-{source.fingerprint()}"
    if fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    say = lambda message: console.print(f"[dim]  {name}: {message}[/dim]")  # noqa: E731
    candidates: list[Candidate] = []

    def add(runtime: str, precision: str, made_by: str, make: Any) -> None:
        candidate = Candidate(name, runtime, precision, made_by)
        candidates.append(candidate)
        plugin = runtime_plugin(runtime)
        if not plugin.available():
            candidate.error = f"skipped: not installed ({plugin.install_line()})"
            return
        say(f"{runtime} {precision}")
        started = time.perf_counter()
        try:
            candidate.single, candidate.batched = make()
        except CompactAIError as exc:
            candidate.error = str(exc)
        candidate.figures["convert_seconds"] = round(time.perf_counter() - started, 1)

    onnx = source.to_onnx(work / "model.onnx") if not (work / "model.onnx").is_file() \
        else source.as_onnx(work / "model.onnx")
    add("onnxruntime", "fp32", "torch.onnx.export", lambda: (onnx, onnx))
    mode = "dynamic" if source.kind == "transformer" else "static"

    def ort_int8() -> tuple[ModelHandle, ModelHandle]:
        path = work / "ort-int8" / "model.onnx"
        if path.is_file():
            handle = source.as_onnx(path)
        else:
            context = Context(task=task, work_dir=work / "ort-int8-work", progress=say)
            quantized = create_technique("quantize", mode=mode, objective="size").apply(source, context)
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(quantized.path, path)
            handle = source.as_onnx(path)
        return handle, handle

    add("onnxruntime", "int8", f"compactai quantize --mode {mode}", ort_int8)
    openvino = runtime_plugin("openvino")
    for precision, quantize in (("fp32", None), ("int8", "int8")):
        folder = work / f"openvino-{precision}"

        def ov(folder: Path = folder, quantize: str | None = quantize) -> tuple[ModelHandle, ModelHandle]:
            handle = cached(folder / "model.xml", lambda: openvino.convert(source, folder, quantize=quantize, task=task),
                            lambda path: load_openvino(path, name))
            return handle, handle

        add("openvino", precision, "ov.convert_model" if quantize is None else "NNCF quantize (plain PTQ)", ov)

    # a .tflite/.pte fixes every dimension but the batch to the evaluation rows' (MiniLM's padded
    # length), and those rows have differed between processes on this machine: key the files by it
    shape = "x".join(str(d) for d in next(iter(parity_feeds(source, task).values())).shape[1:])

    def device(runtime: str, batch: int, quantize: str | None = None) -> ModelHandle:
        plugin = runtime_plugin(runtime)
        folder = work / f"{runtime}{'-' + quantize if quantize else ''}-b{batch}-{shape}"
        # batch 1 of ExecuTorch: its dynamic-batch file; batch 32 of either: a static batch-32 file
        options = {"batch": batch} if runtime == "litert" or batch > 1 else {}
        return cached(folder / f"model.{plugin.file_format}",
                      lambda: plugin.convert(source, folder, task=task, quantize=quantize, **options),
                      lambda path: source.derive(framework=runtime, path=path, module=None,
                                                 metadata={runtime: {"batch": options.get("batch", "dynamic")}}))

    add("litert", "fp32", "litert_torch.convert (batch 1 and batch 32 files)",
        lambda: (device("litert", 1), device("litert", BATCH)))
    add("executorch", "fp32", "to_edge_transform_and_lower(XNNPACK) (dynamic-batch and batch-32 files)",
        lambda: (device("executorch", 1), device("executorch", BATCH)))
    activations = "dynamic" if source.kind == "transformer" else "static"  # as devices.py chooses
    add("litert", "int8", f"litert-torch PT2EQuantizer, {activations} (batch 1 and batch 32 files)",
        lambda: (device("litert", 1, "int8"), device("litert", BATCH, "int8")))
    # MiniLM's dynamic-batch .pte keeps 1..64 and its int8 conversion took 18 min on the loaded machine:
    # that one file is timed at both batches; the digits CNN's narrows to 1..15, so it gets a batch-32 file
    wide = "the dynamic-batch file at both batches" if source.kind == "transformer" else "dynamic-batch and batch-32 files"
    add("executorch", "int8", f"PT2E XNNPACKQuantizer, {activations} ({wide})",
        lambda: (device("executorch", 1, "int8"), device("executorch", 1, "int8") if source.kind == "transformer"
                 else device("executorch", BATCH, "int8")))
    return candidates, {"source": source, "task": task}


def judge(candidates: list[Candidate], source: ModelHandle, task: Any) -> dict[str, Any]:
    """Size and parity (against torch, on the 64 evaluation rows) of every candidate that converted."""
    feeds = parity_feeds(source, task)
    expected = reference_outputs(source, feeds)
    for candidate in candidates:
        if candidate.error or candidate.single is None:
            continue
        try:
            runner = make_runner(candidate.single, candidate.runtime)
            got = runner.run(feeds)
        except CompactAIError as exc:
            candidate.error = str(exc)
            continue
        mask = feeds.get("attention_mask")
        figures = parity_figures(expected, got, source.output_names, mask)
        candidate.figures.update(
            size_mb=runtime_plugin(candidate.runtime).model_size(candidate.single) / 1e6,
            max_abs_diff=max(figures["max_abs_diff"].values()), mean_cosine=min(figures["mean_cosine"].values()))
        if mask is None:  # the task's metric on its evaluation split (digits: test accuracy)
            quality = task.evaluate(runner)
            candidate.figures["quality"] = {"metric": f"{quality.metric} ({task.eval_split})", "value": quality.value}
        else:  # the embedding metric (cosine_min to torch) on the 64 rows: the split's other lengths do not fit a .pte
            cosines = (normalize(mean_pool(expected[0], mask)) * normalize(mean_pool(got[0], mask))).sum(axis=1)
            candidate.figures["quality"] = {"metric": "sentence cosine min (64 rows)", "value": float(cosines.min()),
                                            "mean": float(cosines.mean())}
    return feeds


def time_all(candidates: list[Candidate], feeds: dict[str, Any], rounds: int, queries: int, seconds: float) -> None:
    """Batch-1 p50 and batch-32 items/s of every live candidate, in interleaved rounds."""
    live = [c for c in candidates if not c.error and c.single is not None]
    single = {k: v[:1] for k, v in feeds.items()}
    batch = {k: v[:BATCH] for k, v in feeds.items()}
    runners = []
    for c in live:
        one = make_runner(c.single, c.runtime)  # type: ignore[arg-type]
        runners.append((one, one if c.batched is c.single else make_runner(c.batched, c.runtime)))  # type: ignore[arg-type]
    for round_number in range(rounds):
        console.print(f"[dim]  timing round {round_number + 1}/{rounds}[/dim]")
        for index in turn_order(len(live), round_number):
            one, many = runners[index]
            latency = measure_latency(one, single, min_queries=queries, min_seconds=seconds, warmup=5)
            throughput, _ = measure_throughput(many, batch, min_batches=max(3, queries // 10), min_seconds=seconds)
            live[index].samples.append((latency.p50_ms, throughput))
    for candidate, (one, _) in zip(live, runners):
        candidate.figures.update(
            p50_ms_batch1=statistics.median(s[0] for s in candidate.samples),
            items_per_s_batch32=statistics.median(s[1] for s in candidate.samples),
            rounds=[{"p50_ms": s[0], "items_per_s": s[1]} for s in candidate.samples])
        candidate.figures["threads"] = getattr(one, "threads", None)


def print_table(candidates: list[Candidate]) -> None:
    table = Table(title=f"Runtimes: size, batch-1 p50, batch-{BATCH} throughput (median of interleaved rounds)")
    for column in ("model", "runtime", "precision", "MB", "max abs diff", "min mean cos", "quality", "p50 @1 ms",
                   f"items/s @{BATCH}", "note"):
        table.add_column(column)
    def num(figures: dict[str, Any], key: str, fmt: str) -> str:
        return format(figures[key], fmt) if key in figures else "-"

    for c in candidates:
        f = c.figures
        table.add_row(c.model, c.runtime, c.precision, num(f, "size_mb", ".2f"), num(f, "max_abs_diff", ".2g"),
                      num(f, "mean_cosine", ".4f"), format(f["quality"]["value"], ".4f") if "quality" in f else "-",
                      num(f, "p50_ms_batch1", ".2f"),
                      num(f, "items_per_s_batch32", ".0f"), (c.error or "")[:70])
    console.print(table)


def winners(candidates: list[Candidate]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for model in dict.fromkeys(c.model for c in candidates):
        timed = [c for c in candidates if c.model == model and "p50_ms_batch1" in c.figures]
        if timed:
            fast = min(timed, key=lambda c: c.figures["p50_ms_batch1"])
            wide = max(timed, key=lambda c: c.figures["items_per_s_batch32"])
            out[model] = {"batch_1": f"{fast.runtime} {fast.precision}", f"batch_{BATCH}": f"{wide.runtime} {wide.precision}"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,minilm")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 20 queries (a few minutes)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--convert-only", action="store_true", help="convert and check parity (fills the cache; "
                        "no timing, so it need not hold the benchmark lock)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    parser.add_argument("--fresh", action="store_true", help="convert again instead of reusing cached files")
    args = parser.parse_args()
    rounds, queries, seconds = (3, 20, 0.3) if args.quick else (args.rounds, 100, 1.0)
    load_start = os.getloadavg()
    started = time.perf_counter()
    candidates: list[Candidate] = []
    for name in args.models.split(","):
        built, context = build(name, args.fresh)
        feeds = judge(built, context["source"], context["task"])
        candidates.extend(built)
        if not args.convert_only:
            time_all(built, feeds, rounds, queries, seconds)
    print_table(candidates)
    best = winners(candidates)
    for model, regimes in best.items():
        console.print(f"{model}: fastest at batch 1: {regimes['batch_1']}; at batch {BATCH}: {regimes[f'batch_{BATCH}']}")
    report = {
        "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "seconds": round(time.perf_counter() - started, 1), "rounds": rounds, "queries": queries,
        "min_seconds": seconds, "batch": BATCH, "environment": environment(), "winners": best,
        "candidates": [{"model": c.model, "runtime": c.runtime, "precision": c.precision, "made_by": c.made_by,
                        "error": c.error, **c.figures} for c in candidates],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if args.convert_only:
        return
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
