"""`compactai prune`: structured pruning (or unstructured sparsity), measured against the baseline."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import typer

from compactai.cli._common import (
    EXAMPLE_OPTION,
    HF_TASK_OPTION,
    JSON_OPTION,
    Output,
    app,
    check_output_dir,
    check_time_limit,
    resolve_model,
    table,
    task_from_data,
)


@app.command()
def prune(
    path: str | None = typer.Argument(None, help="Model: an ONNX file or .pt2 program (converted to an nn.Module "
                                       "with onnx2torch, parity-checked), a Hugging Face directory (BERT family, "
                                       "GPT-2), or use --example."),
    example: str | None = EXAMPLE_OPTION,
    data: Path | None = typer.Option(None, "--data", help="Task data for PATH: .npz with '<split>/<input>' arrays "
                                        "(splits train, calibration, validation, test; optional '<split>/labels')."),
    hf_task: str | None = HF_TASK_OPTION,
    ratio: float = typer.Option(0.5, help="Fraction of the --target quantity to remove, in (0, 1)."),
    target: str = typer.Option("params", help="What --ratio reduces: params, macs, latency (measured ORT p50) "
                                              "or channels (channels/neurons/heads)."),
    criterion: str = typer.Option("l2", help="Importance: l1, l2, taylor (weight x gradient on task data), bn, "
                                             "fluctuation (input variance x weight on calibration data)."),
    ranking: str = typer.Option("layer", help="layer (each layer loses the same fraction) or global."),
    scope: str = typer.Option("auto", help="auto, channels, ffn, heads or ffn+heads (transformers)."),
    steps: int = typer.Option(1, help="Pruning steps (iterative: prune, fine-tune, repeat)."),
    finetune_epochs: int | None = typer.Option(
        None, "--finetune-epochs", help="Fine-tune epochs after each step (default: 3 when the task has labels and "
                                        "train/validation splits and --reconstruct is off, else 0)."),
    max_drop: float = typer.Option(
        2.0, "--max-drop", help="Quality the pruned model may lose, in metric points (2.0 = two accuracy points). "
                                "More: the model is still written, the table says QUALITY LOST, exit 3."),
    max_batches: int | None = typer.Option(None, "--max-batches", help="Cap on batches per fine-tune epoch."),
    lr: float = typer.Option(1e-3, help="Fine-tune learning rate (AdamW)."),
    kd_weight: float = typer.Option(0.0, "--kd-weight", help="Weight of KL to the unpruned model (classification)."),
    protect: list[str] = typer.Option([], "--protect", help="Layer name whose output channels are kept (repeat)."),
    round_to: int | None = typer.Option(
        None, "--round-to", help="Keep channel/neuron counts at multiples of N (1: no rounding). Default: 8 or 16, "
                                 "whichever this CPU's ONNX Runtime kernels run faster (measured once, cached)."),
    reconstruct: bool = typer.Option(False, "--reconstruct", help="Transformers (--scope ffn, heads or "
                                     "ffn+heads): re-fit each pruned FFN's output projection, and the attention "
                                     "output projection of each layer that lost heads, by least squares on train "
                                     "tokens so the layer outputs stay close to the original (no fine-tuning)."),
    reconstruct_samples: int = typer.Option(1024, "--reconstruct-samples", help="Train sequences for --reconstruct."),
    unstructured: bool = typer.Option(False, "--unstructured", help="Zero the smallest weights instead (no "
                                                                    "speed-up on dense runtimes; measured)."),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Write model.onnx and results.json here."),
    runtime: str = typer.Option("all", "--runtime", "-r", help="Measure on onnxruntime, torch, or all."),
    threads: int | None = typer.Option(None, help="Intra-op threads (default: all CPUs of this process)."),
    queries: int = typer.Option(200, help="Minimum timed batch-1 queries per measurement."),
    seconds: float = typer.Option(1.0, help="Minimum seconds of timed batch-1 queries."),
    time_limit: float | None = typer.Option(None, "--time-limit", help="Seconds for pruning + fine-tuning."),
    check_rounds: int = typer.Option(
        5, "--check-rounds", help="Interleaved rounds timing the pruned model against the unpruned one on ONNX "
                                  "Runtime at batch 1; a pruned model that is not faster exits 3 (0: no check)."),
    seed: int = typer.Option(0, help="Seed for data order."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Prune a model so it is physically smaller and measure it next to the baseline: params, MACs,
    p50/p90 latency on ONNX Runtime and PyTorch, quality; writes OUT/model.onnx + results.json."""
    from compactai.errors import BudgetNotMetError, ParameterError, UnknownNameError
    from compactai.measure import RUNTIMES, MeasureConfig, measure
    from compactai.results import save_model, write_results
    from compactai.techniques import Context, create_technique

    out = Output(json_output)
    runtimes = list(RUNTIMES) if runtime == "all" else [runtime]
    if any(r not in RUNTIMES for r in runtimes):
        raise UnknownNameError(f"Unknown runtime '{runtime}'; choose onnxruntime, torch or all.")
    if not (math.isfinite(max_drop) and 0 <= max_drop <= 100):
        raise ParameterError(f"--max-drop must be a number of metric points from 0 to 100 (e.g. 2.0); got {max_drop}.")
    if round_to is not None and not 1 <= round_to <= 256:
        raise ParameterError(f"--round-to must be a whole number from 1 to 256 (1: no rounding); got {round_to}.")
    common: dict[str, Any] = {"ratio": ratio, "steps": steps, "finetune_epochs": finetune_epochs or 0, "lr": lr,
                              "kd_weight": kd_weight, "max_batches": max_batches, "protect": list(protect)}
    if unstructured:
        if reconstruct:
            raise ParameterError("--reconstruct re-fits layers after structured pruning of FFN neurons or heads; drop --unstructured "
                                 "or --reconstruct.")
        technique = create_technique("unstructured_prune", ranking=ranking, **common)
    else:
        technique = create_technique("structured_prune", target=target, criterion=criterion, ranking=ranking,
                                     scope=scope, reconstruct=reconstruct, reconstruct_samples=reconstruct_samples,
                                     **common)
    technique.validate()  # bad parameters fail before any model is loaded
    config = MeasureConfig(min_queries=queries, min_seconds=seconds, warmup=min(20, queries), memory=False,
                           energy=False, threads=threads, throughput_min_batches=10 if queries >= 50 else 3)
    config.check()
    check_time_limit(time_limit)
    if not 0 <= check_rounds <= 100:
        raise ParameterError(f"--check-rounds must be a whole number from 0 to 100; got {check_rounds}.")
    check_output_dir(out_dir)
    with out.progress("Pruning") as say:
        source, task, info = resolve_model(path, example, progress=lambda e, n, acc: say(f"training example {e}/{n}"),
                                           hf_task=hf_task)
        from compactai.techniques.prune.convert import prunable_handle
        from compactai.techniques.prune.engine import check_prunable

        say("converting to an nn.Module with real layers (parity-checked)")
        handle = prunable_handle(source)  # an ONNX file, .pt2 program or GPT-2 Conv1D model gets real layers
        check_prunable(handle)  # before any measurement: fail fast on a model that cannot be pruned
        if handle is not source:
            info["converted"] = handle.metadata.get("converted_from")
        if not unstructured:
            if round_to is None:
                from compactai.techniques.prune.rounding import default_round_to

                say("channel multiple for this CPU (measured once, cached)")
                round_to = default_round_to(threads)
            technique.params["round_to"] = round_to
        if reconstruct:
            from compactai.techniques.prune.structured import check_reconstructable

            check_reconstructable(handle.module, scope)
        if data is not None:
            task = task_from_data(data, handle)
            info["data"] = str(data)
        if finetune_epochs is None:
            technique.params["finetune_epochs"] = default_finetune_epochs(task, reconstruct)
        baseline = {}
        for name in runtimes:
            say(f"baseline on {name}")  # ONNX Runtime runs the user's own file; torch the converted module
            baseline[name] = measure(source if name == "onnxruntime" else handle, task, runtime=name, config=config)
        deadline = time.monotonic() + time_limit if time_limit else None
        context = Context(task=task, teacher=handle, seed=seed, progress=say, deadline=deadline, threads=threads,
                          work_dir=out_dir or Path.cwd() / ".compactai-work")
        started = time.monotonic()
        pruned = technique.apply(handle, context)
        prune_seconds = time.monotonic() - started
        if out_dir is not None:
            say("exporting model.onnx (with parity check)")
            onnx_path = save_model(pruned, out_dir)
            pruned.to_onnx(onnx_path)  # reuse the written file for the measurements below
        measured = {}
        for name in runtimes:
            say(f"pruned model on {name}")
            measured[name] = measure(pruned, task, runtime=name, config=config)
        speed = None
        if not unstructured and check_rounds > 0:
            say(f"pruned vs unpruned on onnxruntime, {check_rounds} interleaved rounds")
            speed = latency_check(source, pruned, config, check_rounds)
    decisions = pruned.metadata["history"][-1]["decisions"]
    result: dict[str, Any] = {
        "command": "prune",
        "technique": technique.name,
        "source": info,
        "seconds": round(prune_seconds, 1),
        "baseline": {k: v.to_dict() for k, v in baseline.items()},
        "measurements": {k: v.to_dict() for k, v in measured.items()},
        "quality": measured[runtimes[0]].quality,
        "pruning": {k: v for k, v in decisions.items() if k != "history"},
        "removed": decisions.get("history", []),
    }
    if unstructured:
        from compactai.techniques.prune.unstructured import compressed_size

        result["compressed_size_bytes"] = {
            "baseline": compressed_size(source.to_onnx().path),
            "pruned": compressed_size(pruned.to_onnx().path),  # type: ignore[arg-type]
        }
    if speed is not None:
        result["latency_check"] = speed
    result["problem"] = quality_lost(result["quality"], max_drop)
    result["status"] = "ok" if result["problem"] is None else "quality_lost"
    if result["problem"] is None and speed is not None and not speed["faster"]:
        result["status"] = "slower_than_parent"
        result["problem"] = (f"The pruned model is not faster than the unpruned one at batch 1 on ONNX Runtime "
                             f"(p50 {speed['pruned_p50_ms']:.4g} ms vs {speed['parent_p50_ms']:.4g} ms, median of "
                             f"{speed['rounds']} interleaved rounds); keep the unpruned model, or prune more "
                             "(--ratio) or with another --round-to.")
    if out_dir is not None:
        result["paths"] = {"model": str(Path(out_dir) / "model.onnx")}
        sections = {k: v for k, v in result.items() if k not in ("command",)}
        result["paths"]["results"] = str(write_results(out_dir, "prune", pruned, seed=seed, **sections))
    print_prune(out, result)
    out.emit(result)
    if result["problem"] is not None:
        where = f" The model was written to {result['paths']['model']} but is not fit to use." if out_dir else ""
        if result["status"] == "slower_than_parent" and out_dir:
            where = f" It was written to {result['paths']['model']}, marked slower in results.json."
        raise BudgetNotMetError(result["problem"] + where)


def latency_check(parent: Any, pruned: Any, config: Any, rounds: int) -> dict[str, Any]:
    """Batch-1 ONNX Runtime p50 of ``pruned`` against ``parent`` in interleaved rounds (load on a
    shared machine then hits both alike); ``faster`` only when the pruned median is lower."""
    from compactai.measure import interleaved_latency

    parent_t, pruned_t = interleaved_latency([parent, pruned], config, rounds)
    return {"rounds": rounds, "parent_p50_ms": parent_t["latency_p50_ms"], "pruned_p50_ms": pruned_t["latency_p50_ms"],
            "speedup": parent_t["latency_p50_ms"] / pruned_t["latency_p50_ms"],
            "faster": pruned_t["latency_p50_ms"] < parent_t["latency_p50_ms"],
            "parent_rounds_ms": parent_t["latency_rounds_ms"], "pruned_rounds_ms": pruned_t["latency_rounds_ms"]}


def default_finetune_epochs(task: Any, reconstruct: bool) -> int:
    """3 epochs for labelled tasks with train and validation splits: at 50% of the MACs, digits
    loses about 9 accuracy points without fine-tuning (benchmarks/pruning.py). Embedding tasks
    and --reconstruct runs fine-tune only when asked (slow on CPU, or re-fitted by least squares)."""
    if task is None or reconstruct or not {"train", "validation"} <= set(task.splits):
        return 0
    return 3 if task.split("train").labels is not None else 0


def quality_lost(quality: dict[str, Any] | None, max_drop: float) -> str | None:
    """The loss of quality beyond --max-drop (metric points, i.e. hundredths), or None."""
    figures = quality or {}
    drop = figures.get("drop")
    if drop is None or drop * 100 <= max_drop + 1e-9:
        return None
    return (f"The pruned model lost {drop * 100:.2f} points of {figures['metric']} ({figures['baseline']:.4f} -> "
            f"{figures['value']:.4f}), more than --max-drop {max_drop:g}; fine-tune (--finetune-epochs), prune less "
            "(--ratio) or allow more with --max-drop.")


def print_prune(out: Output, result: dict[str, Any]) -> None:
    """Baseline vs pruned: params, MACs, size, ORT/torch p50/p90, quality, and the ratios."""
    base, new = result["baseline"], result["measurements"]
    first_b, first_p = next(iter(base.values())), next(iter(new.values()))
    rows: list[list[Any]] = []

    def ratio(a: Any, b: Any) -> str:
        return f"{a / b:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else "-"

    for label, key, change in (("parameters", "params", "smaller"), ("MACs (batch 1)", "macs", "fewer"),
                               ("ONNX size (MB)", "size_mb", "smaller")):
        rows.append([label, first_b[key], first_p[key], f"{ratio(first_b[key], first_p[key])} {change}"])
    sizes = result.get("compressed_size_bytes")
    if sizes:
        rows.append(["gzip size (MB)", sizes["baseline"] / 1e6, sizes["pruned"] / 1e6,
                     ratio(sizes["baseline"], sizes["pruned"]) + " smaller"])
    labels = {"onnxruntime": "ORT", "torch": "torch"}
    for label, b, p in ((labels[name], base[name], new[name]) for name in new):
        for q in ("p50", "p90"):
            key = f"latency_{q}_ms"
            rows.append([f"{label} latency {q} (ms)", b[key], p[key], ratio(b[key], p[key]) + " speed-up"])
        rows.append([f"{label} throughput (items/s)", b["throughput_items_per_s"], p["throughput_items_per_s"],
                     ratio(p["throughput_items_per_s"], b["throughput_items_per_s"])])
    quality = first_p.get("quality")
    if quality:
        drop = quality.get("drop")
        rows.append([f"quality ({quality['metric']})", quality["baseline"], quality["value"],
                     f"{-drop:+.4f}" if drop is not None else "-"])
    speed = result.get("latency_check")
    if speed:
        rows.append([f"ORT p50, {speed['rounds']} interleaved rounds (ms)", speed["parent_p50_ms"],
                     speed["pruned_p50_ms"], f"{speed['speedup']:.2f}x speed-up"])
    lost = result.get("status") == "quality_lost"
    if lost:  # no speed-up column next to a model that lost its quality
        rows = [row[:3] + (["QUALITY LOST"] if row[0].startswith("quality") else ["-"]) for row in rows]
    title = f"compactai prune ({result['technique']})" + (" -- QUALITY LOST, NOT USABLE" if lost else "")
    out.console.print(table(title, ["figure", "baseline", "pruned", "change"], rows))
    if lost:
        out.console.print(f"[bold red]quality lost:[/bold red] {result['problem']}", highlight=False)
    elif result.get("status") == "slower_than_parent":
        out.console.print(f"[bold red]slower than the unpruned model:[/bold red] {result['problem']}", highlight=False)
    pruning = result["pruning"]
    if "zero_fraction" in pruning:
        out.console.print(f"zero fraction of the sparsified weights: {pruning['zero_fraction']:.1%} "
                          f"({pruning['zero_fraction_all_params']:.1%} of all parameters)")
        out.console.print(f"[yellow]note:[/yellow] {pruning['note']}")
    else:
        reduction = ", ".join(f"{k} -{v:.1%}" for k, v in pruning.get("reduction", {}).items())
        out.console.print(f"removed {sum(e['count'] for e in result['removed'])} {pruning.get('scope')} elements "
                          f"({pruning.get('criterion')}, {len(result['removed'])} layer groups): {reduction}")
    if "paths" in result:
        out.console.print(f"wrote {result['paths']['model']} and {result['paths']['results']}")
