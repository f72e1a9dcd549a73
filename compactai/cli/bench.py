"""`compactai bench`: MLPerf Inference's scenarios on this machine, for a model or a bundle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from compactai.cli._common import JSON_OPTION, Output, app, check_output_dir, fmt, table, task_from_data
from compactai.errors import BadInputError, ModelNotFoundError, UnknownNameError


@app.command()
def bench(
    path: str | None = typer.Argument(None, help="Model (.onnx, .pt2, Hugging Face directory, OpenVINO "
                                      "model.xml) or a bundle directory (manifest.json + model)."),
    example: str | None = typer.Option(None, "--example", "-e", help="Built-in example (digits, minilm): its "
                                       "model, or with PATH its task and fp32 reference for PATH's quality."),
    data: Path | None = typer.Option(None, "--data", help="Task data (.npz as for quantize): quality on its test split."),
    scenario: list[str] = typer.Option(["all"], "--scenario", "-s", help="single-stream, offline, server or all "
                                       "(repeat the option for several)."),
    runtime: str = typer.Option("onnxruntime", "--runtime", "-r", help="onnxruntime (default), torch (eager), or "
                                "another installed runtime: openvino (runs ONNX or its IR, model.xml), litert or "
                                "executorch (a torch model, .pt2 or --example, is converted first with parity)."),
    duration: float = typer.Option(10.0, "--duration", help="Seconds per scenario run (MLPerf's minimum: 600)."),
    min_queries: int = typer.Option(1024, "--min-queries", help="Queries (offline: samples) per run, at least "
                                    "(MLPerf: 1024 single-stream, 270,336 server, 24,576 offline)."),
    target_qps: float | None = typer.Option(None, "--target-qps", help="Server: Poisson arrival rate (default: "
                                            "half the offline throughput)."),
    latency_bound_ms: float | None = typer.Option(None, "--latency-bound-ms", help="Server: p99 bound (default: "
                                                  "10x the single-query p50)."),
    search_steps: int = typer.Option(6, "--search-steps", help="Server: bisection runs for the highest rate within "
                                     "the bound (0 = no search)."),
    search_duration: float = typer.Option(3.0, "--search-duration", help="Seconds per search run."),
    batch: int = typer.Option(32, "--batch", help="Offline batch size."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads (default: all CPUs of this process)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample order and the arrival times."),
    trusted_key: list[Path] = typer.Option([], "--trusted-key", "-t", help="Verify a bundle's signature and "
                                           "self-test with this public key before benchmarking it."),
    no_quality: bool = typer.Option(False, "--no-quality", help="Skip the quality run."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the JSON to this file "
                                       "(input of `compactai report --decision`)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Benchmark a model the way MLPerf Inference does: single-stream (one query at a time:
    p50/p90/p99 and LoadGen's early-stopping p90 estimate), offline (all samples at once:
    throughput) and server (Poisson arrivals at --target-qps: p99, and the highest rate whose p99
    meets --latency-bound-ms, by bisection). Quality runs on the task's evaluation split with
    MLPerf's rule: at least 99% (and 99.9%) of the fp32 reference. Runs are short by default
    (about a minute) and printed next to MLPerf's minimums: not a submission. Exit 3 when quality
    is below 99% of the reference."""
    from compactai.bench import run_bench
    from compactai.measure import RUNTIME_PLUGINS, runtime_plugin
    from compactai.measure.mlperf import SCENARIOS, ScenarioSettings

    out = Output(json_output)
    wanted = list(SCENARIOS) if "all" in scenario else scenario
    for name in wanted:
        if name not in SCENARIOS:
            raise UnknownNameError(f"Unknown scenario '{name}'; choose single-stream, offline, server or all.")
    if runtime not in RUNTIME_PLUGINS:
        raise UnknownNameError(f"Unknown runtime '{runtime}'; choose one of: {', '.join(RUNTIME_PLUGINS.names())}.")
    runtime_plugin(runtime).require()  # not installed: exit 2 with the install line, before any work
    settings = ScenarioSettings(duration_s=duration, min_queries=min_queries, offline_batch=batch,
                                target_qps=target_qps, latency_bound_ms=latency_bound_ms,
                                search_steps=search_steps, search_duration_s=search_duration, seed=seed)
    settings.check()
    check_output_dir(output.parent if output else None, "-o")
    with out.progress("Benchmarking") as say:
        handle, task, source = _resolve(path, example, data, trusted_key, say)
        result = run_bench(handle, task, wanted, settings, runtime=runtime, threads=threads,
                           quality=not no_quality, progress=say)
    result["source"] = source
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = output.with_suffix(output.suffix + ".tmp")
        tmp.write_text(json.dumps(result, indent=1), encoding="utf-8")
        os.replace(tmp, output)
        result["written"] = str(output)
    print_bench(out, result)
    out.emit(result)
    verdict = (result.get("quality") or {}).get("mlperf") or {}
    if verdict.get("pass_99") is False:
        raise typer.Exit(3)


def _resolve(path: str | None, example: str | None, data: Path | None, keys: list[Path],
             say: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(handle, task or None, source facts) for PATH / bundle / --example / --data."""
    from compactai.examples import load_example
    from compactai.models import load_model

    if path is None and example is None:
        raise BadInputError("Give a model PATH (or a bundle directory), --example NAME, or both.")
    if data is not None and example is not None:
        raise BadInputError("Give --example or --data for the task, not both.")
    loaded = load_example(example, progress=lambda e, n, acc: say(f"training example, epoch {e}/{n}")) if example else None
    if path is None:
        assert loaded is not None
        return loaded.handle, loaded.task, {"example": example}
    source: dict[str, Any] = {"path": path}
    target = Path(path)
    if not target.exists():
        raise ModelNotFoundError(f"Not found: {path}. Pass an .onnx file, a model directory or a bundle directory.")
    if target.is_dir() and (target / "manifest.json").is_file():
        target, source["bundle"] = _bundle_model(target, keys)
    if target.suffix.lower() == ".xml":  # OpenVINO IR (e.g. optimize's OUT/openvino/model.xml)
        from compactai.measure.openvino import load_openvino

        handle = load_openvino(target)
    else:
        handle = load_model(str(target))
    task = None
    if loaded is not None:
        missing = set(handle.input_names) - set(loaded.task.split(loaded.task.eval_split).inputs)
        if missing:
            raise BadInputError(f"{path} takes inputs {sorted(missing)} that the {example} task does not have; "
                                f"use --data with that model's own task data.")
        task, source["example"] = loaded.task, example
        source["reference"] = f"the {example} example's fp32 model"
    elif data is not None:
        say("reading the task data")
        task = task_from_data(data, handle)
        source["reference"] = "PATH itself (from --data: give --example to judge against an fp32 original)"
    return handle, task, source


def _bundle_model(root: Path, keys: list[Path]) -> tuple[Path, dict[str, Any]]:
    from compactai.bundle import VerifyPolicy, load_public_key, parse_manifest, read_metadata, verify_bundle
    from compactai.bundle.manifest import unsafe_path_reason

    if keys:
        verified = verify_bundle(root, VerifyPolicy([load_public_key(k) for k in keys]))
        manifest, checked = verified.manifest, verified.steps
    else:
        manifest, checked = parse_manifest(read_metadata(root)[0]), []
    model = str(manifest.get("model", ""))
    reason = unsafe_path_reason(model)
    if reason:
        raise BadInputError(f"{root}/manifest.json names the model {model!r}, which is {reason}; not benchmarked.")
    info = {"name": manifest.get("name"), "version": manifest.get("version"), "model": model,
            "verified": bool(keys), "checks": checked}
    return root / model, info


def print_bench(out: Output, result: dict[str, Any]) -> None:
    scenarios = result["scenarios"]
    minimums = result["mlperf_minimums"]
    rows: list[list[Any]] = []
    single = scenarios.get("single-stream")
    if single:
        early = single["early_stopping_p90"]
        rows += [["single-stream p50 / p90 / p99 (ms)",
                  f"{single['p50_ms']:.3f} / {single['p90_ms']:.3f} / {single['p99_ms']:.3f}", ""],
                 ["single-stream early-stopping p90 (ms)", fmt(early["estimate_ms"]),
                  f"needs >= {early['min_queries']} queries"],
                 ["single-stream queries / seconds", f"{single['queries']} / {single['seconds']:.1f}",
                  f"{minimums['single-stream']['min_queries']} / {minimums['single-stream']['min_duration_s']}"]]
    off = scenarios.get("offline")
    if off:
        rows += [["offline throughput (samples/s)", fmt(off["throughput_samples_per_s"], 1), f"batch {off['batch']}"],
                 ["offline samples / seconds", f"{off['samples']} / {off['seconds']:.1f}",
                  f"{minimums['offline']['min_samples']:,} / {minimums['offline']['min_duration_s']}"]]
    srv = scenarios.get("server")
    if srv:
        rows += [["server target / achieved QPS", f"{srv['target_qps']:.1f} / {srv['achieved_qps']:.1f}",
                  srv["target_source"]],
                 ["server p99 (ms) vs bound", f"{srv['p99_ms']:.3f} vs {srv['latency_bound_ms']:.3f}",
                  "meets" if srv["meets_bound"] else "MISSES"],
                 ["server queries / seconds", f"{srv['queries']} / {srv['seconds']:.1f}",
                  f"{minimums['server']['min_queries']:,} / {minimums['server']['min_duration_s']}"]]
        if srv.get("search"):
            best = srv["search"]["max_qps_within_bound"]
            rows.append(["server highest QPS within bound", fmt(best, 1),
                         f"{len(srv['search']['steps'])} runs, +-{srv['search']['resolution_qps']:.1f}"])
    quality = result.get("quality")
    if quality:
        verdict = quality["mlperf"]
        rows.append([f"quality ({quality['metric']}, {quality['split']})", fmt(quality["value"], 4),
                     f"fp32 reference {fmt(quality['baseline'], 4)}"])
        rows.append(["MLPerf quality >= 99% / 99.9% of fp32", f"{_word(verdict['pass_99'])} / {_word(verdict['pass_99_9'])}",
                     f"ratio {fmt(verdict['ratio'], 4)}"])
    roof = result["roofline"]
    if roof.get("fraction_of_peak") is not None:
        rows.append([f"roofline: achieved / {roof['precision']} peak (GMAC/s)",
                     f"{roof['achieved_gmacs']:.2f} / {roof[roof['precision'] + '_peak_gmacs']:.1f}",
                     f"{100 * roof['fraction_of_peak']:.1f}% of peak"])
    out.console.print(table(f"bench {result['model']['name']} on {result['runtime']} ({result['threads']} threads)",
                            ["figure", "measured", "MLPerf minimum / note"], rows))
    if roof.get("fraction_of_peak") is not None:
        out.console.print(f"[dim]{roof['formula']}: {roof['fp32_macs_per_cycle']} fp32 / {roof['int8_macs_per_cycle']} "
                          f"int8 MACs/cycle/core x {roof['cores']} cores x {roof['clock_ghz']:.2f} GHz "
                          f"({roof['clock_source']}); {roof['achieved_formula']}[/dim]")
    if roof.get("caveat"):
        out.console.print(f"[yellow]roofline:[/yellow] {roof['caveat']}")
    out.console.print(f"[yellow]note:[/yellow] {result['note']}; load average {result['load_average'][0]:.2f}")


def _word(value: bool | None) -> str:
    return "-" if value is None else ("pass" if value else "FAIL")
