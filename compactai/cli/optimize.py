"""`compactai optimize`: the main job — the best model within a budget, measured on this machine."""

from __future__ import annotations

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
    fmt,
    resolve_model,
    table,
    task_from_data,
)


@app.command()
def optimize(
    path: str | None = typer.Argument(None, help="Model: .onnx, .pt2 or Hugging Face directory."),
    example: str | None = EXAMPLE_OPTION,
    hf_task: str | None = HF_TASK_OPTION,
    data: Path | None = typer.Option(None, "--data", help="Task data for PATH: .npz with '<split>/<input>' arrays "
                                        "(train, calibration, validation, test) and optional '<split>/labels'."),
    budget: str | None = typer.Option(
        None, "--budget", "-b",
        help="Constraints, e.g. 'latency_p90_ms<=2,size_mb<=10,memory_mb<=200'. A limit ending in x is a multiple "
             "of the original's figure ('latency_p90_ms<=0.5x'). Default: 'latency_p90_ms<=0.5x,size_mb<=0.25x'."),
    min_quality: str | None = typer.Option(
        None, "--min-quality", "-q",
        help="Quality to keep: a fraction of the original's (0.99), or 'abs:VALUE' on the metric. Default 0.99."),
    recipe: Path | None = typer.Option(None, "--recipe", help="YAML/JSON recipe file (model, budget, space, seed...)."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Output directory (default: out/optimize-NAME)."),
    max_trials: int | None = typer.Option(None, "--max-trials", help="Stop after this many trials (default 20)."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="Stop starting trials after this long."),
    techniques: str | None = typer.Option(None, "--techniques", help="Comma list to search (default: all that fit)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the sampler and the techniques (default 0)."),
    executor: str = typer.Option("local", "--executor", help="local, or ray (needs compactai[distributed])."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Ray cluster address (default: start one)."),
    storage: str | None = typer.Option(None, "--storage", help="Optuna storage URL shared by workers "
                                          "(default: SQLite in the output directory)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the study in the output directory."),
    threads: int | None = typer.Option(None, help="Intra-op threads for measuring (default: all CPUs)."),
    quick: bool = typer.Option(False, "--quick", help="Fewer timed queries per trial (noisier, faster)."),
    remeasure_rounds: int = typer.Option(3, "--remeasure-rounds", min=0, max=20,
                                         help="Before choosing, measure the original and the contenders (trials that "
                                              "meet every non-latency limit) again in this many interleaved rounds and "
                                              "use the medians; 0: keep each trial's single measurement."),
    bandwidth_mbps: float | None = typer.Option(None, "--bandwidth-mbps", help="Uplink to a server, Mbit/s: the "
                                                "results then say where to split the chosen model (compactai slice)."),
    rtt_ms: float | None = typer.Option(None, "--rtt-ms", help="With --bandwidth-mbps: round-trip time, ms."),
    server_speedup: float = typer.Option(1.0, "--server-speedup", help="With --bandwidth-mbps: the server runs a "
                                                                       "tail this many times faster than this machine."),
    server_overhead_ms: float | None = typer.Option(None, "--server-overhead-ms", help="With --bandwidth-mbps: "
                                                    "per-request server cost, ms (default: measured here on a real "
                                                    "`compactai serve`)."),
    quality_figure: str | None = typer.Option(
        None, "--quality-figure", help="For embedding tasks: the figure --min-quality and the budget read, "
                                       "cosine_min (default, the strictest), cosine_mean or knn_overlap."),
    min_epochs: int = typer.Option(1, "--min-epochs", help="Multi-fidelity schedule: training trials (distill, nas) "
                                   "first train this many epochs; the best 1/--reduction-factor of those at a rung "
                                   "continue from their checkpoint to factor x more epochs, the rest stop (pruned)."),
    reduction_factor: int = typer.Option(3, "--reduction-factor", help="Multi-fidelity schedule: continue the best "
                                         "1/this of the training trials at each rung (successive halving)."),
    no_fidelity: bool = typer.Option(False, "--no-multi-fidelity", help="Train every training trial for its full "
                                     "epochs at once (no rungs)."),
    runtime: str = typer.Option(
        "onnxruntime", "--runtime", "-r",
        help="onnxruntime (default: the search's runtime, nothing more), another installed runtime (openvino), or "
             "auto (every installed one): after the search, the chosen model is measured on those runtimes next to "
             "each runtime's own int8 of its float ancestor (OpenVINO: NNCF), and the fastest at batch 1 that keeps "
             "the quality floor and size limit wins; a non-ONNX Runtime winner is written to OUT/<runtime>/."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Search pipelines of the registered techniques (prune -> distill|nas -> quantize) for the best model
    within the budget: every trial measured on ONNX Runtime, Pareto front, resumable, report.html.
    Training trials run on a multi-fidelity schedule (successive halving on epochs).
    With --runtime auto|NAME the runtime is chosen by measurement too (docs/optimize.md). Exit code 3 when no candidate fits (the closest ones are written)."""
    from compactai.budget import DEFAULT_BUDGET, DEFAULT_MIN_QUALITY, parse_budget
    from compactai.errors import BudgetNotMetError
    from compactai.measure import MeasureConfig
    from compactai.search import SearchConfig
    from compactai.search.fidelity import FidelityConfig
    from compactai.search.optimize import optimize as run_optimize
    from compactai.search.recipe import load_recipe
    from compactai.search.runtimes import resolve_runtimes
    from compactai.search.space import space_for_model, space_from_config

    out = Output(json_output)
    spec = load_recipe(recipe) if recipe else None
    if spec is not None:
        path = path or spec.model
        example = example or spec.example
        budget = budget if budget is not None else spec.budget
        min_quality = min_quality if min_quality is not None else (None if spec.min_quality is None else str(spec.min_quality))
    parsed = parse_budget(DEFAULT_BUDGET if budget is None else budget,
                          DEFAULT_MIN_QUALITY if min_quality is None else min_quality)
    measure = MeasureConfig.quick() if quick else SearchConfig().measure
    measure.threads = threads or (spec.threads if spec else None)
    config = SearchConfig(
        max_trials=max_trials if max_trials is not None else (spec.max_trials if spec else 20),
        max_minutes=max_minutes if max_minutes is not None else (spec.max_minutes if spec else None),
        seed=seed if seed is not None else (spec.seed if spec else 0),
        executor=executor if executor != "local" or spec is None else spec.executor,
        ray_address=ray_address, storage=storage, resume=resume, measure=measure,
        remeasure_rounds=remeasure_rounds, network=_network(bandwidth_mbps, rtt_ms, server_speedup, server_overhead_ms),
        fidelity=FidelityConfig(enabled=not no_fidelity, min_epochs=min_epochs, reduction_factor=reduction_factor),
    )
    if config.executor not in ("local", "ray"):
        from compactai.errors import BadInputError

        raise BadInputError(f"Unknown executor '{config.executor}'; choose local or ray.")
    config.check()  # bad limits fail here, before the model is loaded or the output directory made
    if quality_figure is not None and quality_figure not in QUALITY_FIGURES:
        from compactai.errors import ParameterError

        raise ParameterError(f"--quality-figure must be one of {', '.join(QUALITY_FIGURES)}; got '{quality_figure}'.")
    resolve_runtimes(runtime)  # an unknown or uninstalled runtime fails here too
    check_output_dir(output)
    with out.progress("Optimizing") as say:
        if config.network is not None and server_overhead_ms is None:
            config.network.server_overhead_ms = _measured_overhead(say)
        handle, task, info = resolve_model(path, example, progress=lambda e, n, acc: say(f"training example {e}/{n}"),
                                           hf_task=hf_task)
        if task is None and data is not None:
            task = task_from_data(data, handle)
        if task is None:
            from compactai.errors import BadInputError

            raise BadInputError("optimize needs task data to keep quality: pass --data FILE.npz with your model "
                                "(see the README's 'Your own model' section) or use --example NAME.")
        if quality_figure is not None:
            task = task.scored_by(quality_figure)
        if spec is not None and spec.search_space:
            space = space_from_config([s.model_dump() for s in spec.search_space])
        else:
            space = space_for_model(handle, task, parsed, techniques.split(",") if techniques else None)
        target = output or Path("out") / f"optimize-{info.get('example') or Path(str(path)).stem}"
        check_output_dir(target)

        def on_trial(result: Any) -> None:
            from compactai.results import describe

            if result.status in ("ok", "pruned"):
                f = result.figures
                mark = "within budget" if result.feasible else "outside budget"
                if result.status == "pruned":
                    mark = f"stopped after {result.fidelity['epochs']} epochs by the multi-fidelity schedule"
                say(f"trial {result.number}: {describe(result.recipe)} -> quality {f['quality']:.4f}, "
                    f"p90 {f['latency_p90_ms']:.3f} ms, {f['size_mb']:.2f} MB ({mark})")
            else:
                say(f"trial {result.number}: {describe(result.recipe)} failed: {result.error}")

        try:
            results = run_optimize(handle, task, parsed, target, config, space=space, source=info,
                                   progress=say, on_trial=on_trial, runtime=runtime)
        except BudgetNotMetError:
            import json

            results_path = target / "results.json"
            if results_path.exists():
                saved: dict[str, Any] = json.loads(results_path.read_text())
                saved["paths"] = _paths(target, chosen=bool(saved["model"].get("path")), results=saved)
                print_summary(out, saved)
                out.emit(saved)
            raise
    results["paths"] = _paths(target, chosen=True, results=results)
    print_summary(out, results)
    out.emit({k: v for k, v in results.items() if k != "latency_samples_ms"})


QUALITY_FIGURES = ("cosine_min", "cosine_mean", "knn_overlap")


def _network(bandwidth_mbps: float | None, rtt_ms: float | None, server_speedup: float,
             server_overhead_ms: float | None) -> Any:
    """The stated network (None without --bandwidth-mbps); checked with the rest of the config."""
    from compactai.errors import BadInputError
    from compactai.search.deployment import NetworkSpec

    if bandwidth_mbps is None:
        if rtt_ms is not None or server_overhead_ms is not None:
            raise BadInputError("--rtt-ms and --server-overhead-ms describe a network: give --bandwidth-mbps too.")
        return None
    if rtt_ms is None:
        raise BadInputError("--bandwidth-mbps needs --rtt-ms (the round-trip time to the server, ms).")
    if server_overhead_ms is not None and not server_overhead_ms >= 0:
        raise BadInputError(f"--server-overhead-ms must be 0 or more milliseconds; got {server_overhead_ms}.")
    return NetworkSpec(bandwidth_mbps, rtt_ms, server_speedup, server_overhead_ms or 0.0)


def _measured_overhead(say: Any) -> float:
    import shutil
    import tempfile

    from compactai.cli._slice_run import measure_server_overhead

    work = Path(tempfile.mkdtemp(prefix="compactai-overhead-"))
    try:
        return measure_server_overhead(work, say)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _paths(target: Path, chosen: bool, results: dict[str, Any]) -> dict[str, str]:
    paths = {"output_dir": str(target), "results": str(target / "results.json"), "report": str(target / "report.html"),
             "study": str(target / "study.db")}
    if chosen:
        paths["model"] = str(target / "model.onnx")
    if (target / "candidates").is_dir():
        paths["candidates"] = str(target / "candidates")
    winner = (results.get("runtime_choice") or {}).get("winner") or {}
    if winner.get("runtime") not in (None, "onnxruntime"):
        paths["runtime_winner"] = str(target / winner["path"])
    return paths


def print_summary(out: Output, results: dict[str, Any]) -> None:
    base = results["baseline"]
    chosen = (results.get("chosen") or results.get("closest") or {}).get("figures")
    column = "chosen" if results.get("chosen") else "closest (misses budget)"
    rows = []
    for label, key in (("quality", "quality"), ("size (MB)", "size_mb"), ("params", "params"), ("MACs", "macs"),
                       ("latency p50 (ms)", "latency_p50_ms"), ("latency p90 (ms)", "latency_p90_ms"),
                       ("throughput (items/s)", "throughput_items_per_s"), ("peak memory (MB)", "peak_memory_mb"),
                       ("energy (mJ/inf, " + str(base.get("energy_method")) + ")", "energy_mj")):
        before, after = base.get(key), (chosen or {}).get(key)
        ratio = "-"
        if isinstance(before, (int, float)) and isinstance(after, (int, float)) and after and before:
            if key in ("quality", "throughput_items_per_s"):
                ratio = f"{after / before:.2f}x"
            else:
                ratio = f"{before / after:.2f}x smaller" if after <= before else f"{after / before:.2f}x larger"
        rows.append([label, before, after, ratio])
    if chosen:
        rows.append(["test-split quality", results["task"]["baseline_test"], chosen["test_quality"]["value"], "-"])
    out.console.print(table(f"Original vs {column} ({results['model']['name']})", ["figure", "original", column,
                                                                                  "change"], rows))
    out.console.print(results["selection"]["explanation"])
    if results.get("chosen"):
        out.console.print(f"chosen pipeline: {results['chosen']['label']}")
    elif results.get("closest"):
        out.console.print(f"closest pipeline: {results['closest']['label']}, written as model.onnx although it "
                          "does not meet the budget")
    for name, reason in (results["search"]["space"].get("skipped") or {}).items():
        out.console.print(f"skipped {name}: {reason}")
    if results["selection"].get("stop_reason") and not results.get("chosen"):
        out.console.print(results["selection"]["stop_reason"])
    split = results.get("split")
    if results.get("runtime_choice"):
        print_runtime_choice(out, results)
    if split:
        c, net = split["choice"], split["network"]
        out.console.print(f"split at {net['bandwidth_mbps']:g} Mbit/s, RTT {net['rtt_ms']:g} ms: {c['cut']} "
                          f"({c['end_to_end_ms']:.3f} ms predicted end-to-end; head {c['head_ms']:.3f} + transfer "
                          f"{c['transfer_ms']:.3f} + server {c['overhead_ms']:.3f} + tail {c['tail_ms']:.3f})",
                          highlight=False)
    out.console.print(f"trials: {results['search']['trials_finished']} (stopped by {results['search']['stopped_by']})"
                      f"; report: {results['paths']['report']}")
    _ = fmt


def print_runtime_choice(out: Output, results: dict[str, Any]) -> None:
    """The runtime candidates' table and what was written for the winner."""
    from compactai.cli._runtime_choice import print_candidates

    choice = results["runtime_choice"]
    if choice.get("candidates"):
        print_candidates(out, choice["candidates"], choice.get("quality_floor_validation"), choice["winners"])
        out.console.print(f"float ancestor for the runtimes' own int8: {choice['float_ancestor']}", highlight=False)
    winner = choice.get("winner")
    if winner is None:
        out.console.print(f"runtime choice: {choice.get('note')}")
    elif winner["runtime"] == "onnxruntime":
        out.console.print(f"runtime choice: {winner['label']} wins; model.onnx is it")
    else:
        out.console.print(f"runtime choice: {winner['label']} wins; written to "
                          f"{Path(results['paths']['output_dir']) / winner['path']} (model.onnx stays the ONNX "
                          "Runtime pipeline result)", highlight=False)
