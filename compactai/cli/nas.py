"""`compactai nas`: search for an architecture that meets a measured latency budget on this machine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import typer

from compactai.cli._common import JSON_OPTION, Output, app, check_output_dir, resolve_model, table
from compactai.errors import BadInputError, BudgetNotMetError


@app.command()
def nas(
    example: str | None = typer.Option(None, "--example", "-e",
                                       help="Built-in example: digits (its trained CNN is the teacher and the reference "
                                            "for a relative budget), or minilm with --space encoder (students of "
                                            "the MiniLM encoder, each distilled from it)."),
    data: Path | None = typer.Option(None, "--data",
                                     help="Labelled data instead of an example: an .npz with '<split>/<input>' and "
                                          "'<split>/labels' for train, validation and test (no teacher)."),
    budget: str = typer.Option("latency_p90_ms<=0.5x", "--budget", "-b",
                               help="Latency budget: 'latency_p90_ms<=2' (ms, batch 1, ONNX Runtime) or '<=0.5x' "
                                    "(a multiple of the example teacher's measured p90)."),
    space: str = typer.Option("cnn", "--space",
                              help="Search space: cnn (MobileNet family), mlp, encoder (students of a transformer "
                                   "teacher: layers, heads, FFN width, which teacher layers), or a JSON/YAML file "
                                   "{\"family\": ..., \"choices\": {...}} (see docs/nas.md)."),
    max_trials: int = typer.Option(30, "--max-trials", help="Candidates to propose at most."),
    max_minutes: float | None = typer.Option(None, "--max-minutes",
                                             help="Stop proposing (and cut the training in progress) after this "
                                                  "long; the best candidate so far is written."),
    epochs: int | None = typer.Option(None, "--epochs",
                                      help="Epochs of a candidate that is continued to the last rung (default 18; "
                                           "encoder 6)."),
    min_epochs: int | None = typer.Option(None, "--min-epochs",
                                          help="Epochs of the first rung of successive halving (default 2; encoder 1)."),
    lr: float | None = typer.Option(None, "--lr", help="Peak learning rate of each candidate (AdamW, cosine decay; "
                                                       "default 8e-3, encoder 1e-3)."),
    train_samples: int = typer.Option(0, "--train-samples", min=0,
                                      help="Train on the first N training samples only (0: all), e.g. a quick trial."),
    compare_student: str | None = typer.Option(None, "--compare-student",
                                               help="Encoder space: a distillation student spec (e.g. layers:0,2,5) "
                                                    "re-measured interleaved with the teacher and the chosen student, "
                                                    "for a latency comparison in results.json."),
    relative_to: str = typer.Option("teacher", "--relative-to",
                                    help="Encoder space: what a relative budget ('0.9x') multiplies and what each "
                                         "candidate is timed against in interleaved rounds: teacher (default), or "
                                         "student (the --compare-student, for 'faster than this student')."),
    reduction_factor: int = typer.Option(3, "--reduction-factor",
                                         help="Successive halving: 1 in this many continues past each rung."),
    threads: int | None = typer.Option(None, "--threads", help="ONNX Runtime threads (default: the CPUs available)."),
    distill: bool = typer.Option(True, "--distill/--no-distill", help="Train on the teacher's soft targets too."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampler, initialisation and data order."),
    remeasure_rounds: int = typer.Option(3, "--remeasure-rounds",
                                         help="Interleaved rounds re-measuring the chosen model against the teacher."),
    output: Path = typer.Option(Path("out/nas"), "-o", "--output", help="Output directory."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Hardware-aware neural architecture search. Candidates are screened by a per-part latency table
    measured on this machine, measured whole on ONNX Runtime, and trained with successive halving
    (short runs first, the promising ones continued). Writes OUTPUT/model.onnx, architecture.json,
    results.json and report.html. Exit 3 when no candidate meets the budget (the closest is written)."""
    from compactai.budget import parse_budget
    from compactai.cli._nas_run import label, run_nas
    from compactai.measure import MeasureConfig, default_threads, measure
    from compactai.techniques.nas._train import TrainSettings
    from compactai.techniques.nas.data import labelled_task
    from compactai.techniques.nas.search import NasConfig
    from compactai.techniques.nas.space import load_space

    out = Output(json_output)
    if (example is None) == (data is None):
        raise BadInputError("Give either --example NAME (digits) or --data FILE.npz, not both or neither.")
    search_space = load_space(space)  # a bad space fails before anything is loaded
    encoder = search_space["family"] == "encoder"
    if encoder and example is None:
        raise BadInputError("The encoder space searches students of a transformer teacher: use --example minilm "
                            "(--data has no teacher).")
    if compare_student is not None and not encoder:
        raise BadInputError("--compare-student is for the encoder space (--space encoder).")
    if relative_to not in ("teacher", "student"):
        raise BadInputError(f"--relative-to must be teacher or student; got {relative_to!r}.")
    if relative_to == "student" and compare_student is None:
        raise BadInputError("--relative-to student times candidates against the --compare-student: give one, "
                            "e.g. --compare-student layers:0,2,5.")
    if compare_student is not None:
        from compactai.techniques.distill.students import parse_student_spec

        parse_student_spec(compare_student)  # a bad spec fails before anything loads
    # (epochs, first rung, learning rate, batch size): a distilled encoder student starts from the
    # teacher's weights, so it needs far fewer epochs and a fine-tuning rate
    default_epochs, default_min, default_lr, batch_size = (6, 1, 1e-3, 32) if encoder else (
        18, 2, TrainSettings.lr, TrainSettings.batch_size)
    epochs = default_epochs if epochs is None else epochs
    min_epochs = default_min if min_epochs is None else min_epochs
    parsed = parse_budget(budget)
    latency = [c for c in parsed.constraints if c.key == "latency_p90_ms"]
    if len(latency) != 1 or len(parsed.constraints) != 1:
        raise BadInputError(f"--budget {budget!r}: give exactly one latency_p90_ms limit, e.g. 'latency_p90_ms<=0.5x'.")
    if latency[0].relative and example is None:
        raise BadInputError("A relative budget ('0.5x') needs a teacher to measure; use --example, or give milliseconds.")
    threads = threads or default_threads()
    config = NasConfig(budget_ms=latency[0].value, max_trials=max_trials, max_minutes=max_minutes,
                       min_epochs=min_epochs, reduction_factor=reduction_factor, threads=threads,
                       train=TrainSettings(max_epochs=epochs, seed=seed, lr=default_lr if lr is None else lr,
                                           batch_size=batch_size))
    config.budget_ms = 1.0 if latency[0].relative else config.budget_ms  # checked now, resolved after measuring
    config.check()
    check_output_dir(output)
    teacher, teacher_figures, info = None, None, {"data": str(data)} if data else {}
    with out.progress("Preparing") as say:
        if example is not None:
            handle, task, info = resolve_model(None, example, progress=lambda e, n, acc: say(f"training example {e}/{n}"))
            if handle.module is None or task is None:
                raise BadInputError(f"The example '{example}' has no torch teacher for NAS.")
            if encoder != (handle.kind == "transformer"):
                raise BadInputError(f"The example '{example}' is a {handle.kind} model; search it with "
                                    f"{'--space cnn or mlp' if encoder else '--space encoder'}.")
            say("measuring the teacher (ONNX Runtime, batch 1)")
            measured = measure(handle, None, config=MeasureConfig(min_queries=200, min_seconds=1.0, memory=False,
                                                                  energy=False, threads=threads))
            teacher_figures = {"latency_p50_ms": measured.latency_p50_ms, "latency_p90_ms": measured.latency_p90_ms,
                               "params": measured.params, "quality_test": task.baseline, "handle": handle.to_onnx()}
            teacher = handle.module.eval() if distill else None
            if relative_to == "student":
                teacher_figures["timing"] = student_reference(handle, teacher_figures, compare_student, threads, say)
        else:
            task = labelled_task(data)  # type: ignore[arg-type]
    if latency[0].relative:
        timing = teacher_figures.get("timing")  # type: ignore[union-attr]  # the student with --relative-to student
        config.budget_ms = latency[0].value * (timing.p90_ms if timing is not None
                                               else teacher_figures["latency_p90_ms"])  # type: ignore[index]
    if train_samples:
        task = replace(task, splits={**task.splits, "train": task.split("train").take(min(train_samples,
                                                                                         len(task.split("train"))))})
    output.mkdir(parents=True, exist_ok=True)
    with out.progress(f"Searching (budget p90 <= {config.budget_ms:.4g} ms)") as say:
        if encoder:
            from compactai.cli._nas_encoder import encoder_label, run_encoder_nas

            summary = run_encoder_nas(search_space, handle, task, config, output, info, teacher_figures,  # type: ignore[arg-type]
                                      remeasure_rounds, compare_student, say)
            label = encoder_label
        else:
            summary = run_nas(search_space, task, teacher, config, output, info, teacher_figures, remeasure_rounds, say)
    _print(out, summary, label)
    out.emit(summary)
    if summary["status"] != "ok":
        written = "The closest model" if summary["status"] == "budget_not_met" else "The model (not fit to use)"
        raise BudgetNotMetError(f"{summary['problem']} {written} was written to {summary['model']}.")


def _print(out: Output, summary: dict[str, Any], label: Any) -> None:
    chosen, test, teacher = summary["chosen"], summary["test"], summary.get("teacher") or {}
    rows = [["test " + test["metric"], test.get("teacher"), test.get("student")],
            ["p90 latency (ms)", teacher.get("latency_p90_ms"), chosen.get("latency_p90_ms_remeasured")],
            ["parameters", teacher.get("params"), chosen.get("params")]]
    out.console.print(table(f"NAS: {chosen['label']} (budget p90 <= {summary['budget_ms']:.4g} ms)",
                            ["figure", "teacher", "chosen"], rows))
    predictor = summary["predictor"]
    out.console.print(
        f"candidates {summary['counts']}; stopped by {summary['stopped_by']} after {summary['seconds']} s; "
        f"fidelity {[(r['epochs'], r['candidates']) for r in summary['fidelity_schedule']]}; predictor Spearman "
        f"{predictor.get('spearman')} MRE {predictor.get('mean_relative_error')}; report: {summary['report']}",
        highlight=False)


def student_reference(handle: Any, teacher_figures: dict[str, Any], spec: str | None, threads: int,
                      say: Any) -> Any:
    """The --compare-student as the timing reference: built from the teacher, its ONNX form and its
    batch-1 p50/p90 from 3 rounds interleaved with the teacher."""
    from compactai.measure import MeasureConfig, interleaved_latency
    from compactai.techniques.distill.students import build_student, parse_student_spec
    from compactai.techniques.nas.encoder_search import Reference

    say(f"measuring the comparison student {spec} (interleaved with the teacher)")
    student = build_student(parse_student_spec(spec or ""), handle, None).eval()
    onnx = handle.derive(module=student, name="reference").to_onnx(parity=False)
    rows = interleaved_latency([teacher_figures["handle"], onnx],
                               MeasureConfig(min_queries=200, min_seconds=0.5, threads=threads), 3)
    return Reference(onnx, rows[1]["latency_p50_ms"], rows[1]["latency_p90_ms"])
