"""`compactai distill`: train a small student to mimic a teacher, then measure both on ONNX Runtime."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from compactai.cli._common import (
    HF_TASK_OPTION,
    JSON_OPTION,
    Output,
    app,
    check_output_dir,
    resolve_model,
    table,
    task_from_data,
)
from compactai.errors import BadInputError, BudgetNotMetError
from compactai.models.onnx_teacher import as_teacher


@app.command()
def distill(
    teacher: str | None = typer.Option(None, "--teacher", "-t",
                                          help="Your teacher model (.onnx, .pt2 or Hugging Face directory), with --data "
                                               "(or --example for the example's data)."),
    data: Path | None = typer.Option(None, "--data", help="Task data for --teacher: .npz with '<split>/<input>' arrays "
                                        "(a train split to learn from, validation, test; optional '<split>/labels')."),
    hf_task: str | None = HF_TASK_OPTION,
    example: str | None = typer.Option(None, "--example", "-e", help="Built-in example (teacher and data): digits or minilm."),
    student: str = typer.Option("auto", "--student", "-s",
                                help="layers:0,2,4 | width:0.5 | digits-cnn:12,24,48 | mlp:128 | self | a .pt2 file | "
                                     "auto (from the teacher's real shape: every other layer of its layer stack; "
                                     "an ONNX teacher: an MLP at half its hidden widths)."),
    temperature: float = typer.Option(4.0, "--temperature", "-T", help="Softmax temperature of the soft targets."),
    alpha: float = typer.Option(0.9, "--alpha", help="Weight of the soft-target loss (1 - alpha: hard labels)."),
    epochs: int = typer.Option(10, "--epochs", help="Maximum epochs (early stopping on validation may end sooner)."),
    lr: float = typer.Option(1e-3, "--lr", help="Peak learning rate (AdamW, warm-up then cosine decay)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Training batch size."),
    embedding_loss: str = typer.Option("cosine+mse", "--embedding-loss", help="Encoders: cosine, mse or cosine+mse."),
    hidden_weight: float = typer.Option(0.0, "--hidden-weight", help="Encoders: weight of the token-state MSE."),
    augment: str = typer.Option("none", "--augment",
                                help="Classifiers on images: none, shift (8 fixed rolled shifts) or translate (random "
                                     "shifts up to 1/8 of the image, --views per image); the teacher labels each view."),
    mixup: float = typer.Option(0.0, "--mixup",
                                help="Classifiers: blend each view with another training input, weight ~ Beta(m, m) "
                                     "(e.g. 1.0; 0: off); the teacher labels the blend, labels are blended one-hot."),
    views: int = typer.Option(16, "--views",
                              help="Augmented views per training sample for translate or mixup, each labelled once by the "
                                   "teacher (teacher time grows with views x training samples)."),
    dropout: str = typer.Option("keep", "--dropout", help="Student dropout while training: keep or off."),
    freeze: str = typer.Option("none", "--freeze", help="Keep the student's embedding tables fixed: none or embeddings."),
    patience: int = typer.Option(3, "--patience", help="Validations without improvement before stopping."),
    final_weights: str = typer.Option("best", "--final-weights",
                             help="Weights to return: best (on the validation split) or last (after the learning rate "
                                  "has decayed; steadier when the validation split is small)."),
    max_minutes: float = typer.Option(30.0, "--max-minutes", help="Training time budget; the best model so far is kept."),
    min_quality: str | None = typer.Option(
        None, "--min-quality", "-q",
        help="Quality the student must keep on the test split: a fraction of the teacher's (0.95) or 'abs:VALUE'. "
             "Missed: the model is still written, exit 3. Always checked on the validation split: a classifier must "
             "get half-way from chance to the teacher, other students must beat their untrained selves."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint of the same run in the work dir."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation and data order."),
    output: Path | None = typer.Option(None, "-o", "--output",
                                       help="Output directory for model.onnx and results.json (default: out/distill)."),
    work_dir: Path | None = typer.Option(None, "--work-dir", help="Checkpoints (default: OUTPUT/work)."),
    queries: int = typer.Option(100, help="Minimum timed batch-1 queries per model."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Knowledge distillation: a smaller student (fewer layers, narrower, or your architecture) trained on
    the teacher's soft targets or embeddings, with early stopping, a time budget and resumable
    checkpoints. Writes OUTPUT/model.onnx and results.json and compares student and teacher."""
    from compactai.budget import parse_min_quality
    from compactai.measure import MeasureConfig, measure
    from compactai.results import save_model, write_results
    from compactai.techniques import Context, create_technique
    from compactai.techniques.distill.students import parse_student_spec

    out = Output(json_output)
    output = output or Path("out/distill")
    floor = parse_min_quality(min_quality) if min_quality is not None else None
    if example is None and (teacher is None or data is None):
        raise BadInputError("distill needs a teacher and data to train on: --teacher MODEL --data FILE.npz (with a "
                            "train split), or --example NAME (digits, minilm).")
    if example is not None and data is not None:
        raise BadInputError("--data goes with --teacher: an example brings its own data. Drop --data or --example.")
    parse_student_spec(student)  # bad specs fail before any model is loaded
    if teacher is not None:
        from compactai.models.load import refuse_unsafe_file

        refuse_unsafe_file(teacher)  # a pickled or code-running teacher fails before the example loads
    technique = create_technique(
        "distill", student=student, temperature=temperature, alpha=alpha, epochs=epochs, lr=lr,
        batch_size=batch_size, embedding_loss=embedding_loss, hidden_weight=hidden_weight, augment=augment,
        mixup=mixup, views=views, dropout=dropout, freeze=freeze, patience=patience, final_weights=final_weights,
        max_minutes=max_minutes, resume=resume)
    technique.validate()
    config = MeasureConfig(min_queries=queries, min_seconds=0.5, memory=False)
    config.check()
    check_output_dir(output)
    with out.progress("Distilling") as say:
        if example is not None:
            handle, task, info = resolve_model(None, example, progress=lambda e, n, acc: say(f"training example {e}/{n}"))
            if teacher is not None:
                handle, task = _own_teacher(teacher, task, hf_task)
                info["teacher"] = teacher
        else:
            assert teacher is not None and data is not None
            handle, _, info = resolve_model(teacher, None, hf_task=hf_task)
            say("scoring the teacher on --data")
            task = task_from_data(data, handle)
            if "train" not in task.splits:
                raise BadInputError(f"{data} has no train split to distill on; add 'train/<input>' arrays "
                                    f"({', '.join(handle.input_names)}) next to {', '.join(sorted(task.splits))}.")
            info = {"teacher": teacher, "data": str(data)}
    trainable = as_teacher(handle)  # an ONNX teacher runs on ONNX Runtime for its targets
    context = Context(task=task, teacher=trainable, seed=seed, work_dir=work_dir or output / "work")
    with _training_bar(out) as progress:
        context.progress = progress
        started = time.monotonic()
        student_handle = technique.apply(trainable, context)
        train_seconds = time.monotonic() - started
    with out.progress("Measuring") as say:
        say("teacher on onnxruntime")
        baseline = measure(handle, task, runtime="onnxruntime", config=config, progress=say)
        say("student: export with parity check")
        model_path = save_model(student_handle, output)
        measured = measure(student_handle, task, runtime="onnxruntime", config=config, progress=say)
    decisions = student_handle.metadata["history"][-1]["decisions"]
    if handle.module is None:  # an ONNX teacher's parameters are its initializers
        from compactai.measure import parameter_count

        decisions["teacher_params"] = parameter_count(handle)
    problem = quality_problem(decisions.get("sanity") or {}, floor, measured.quality, baseline.quality, decisions)
    status = "ok" if problem is None else "quality_lost"
    results_path = write_results(
        output, "distill", student_handle, seed=seed, source=info, status=status, problem=problem,
        baseline={"onnxruntime": baseline.to_dict()}, measurements={"onnxruntime": measured.to_dict()},
        quality=measured.quality, distill={**decisions, "train_seconds": round(train_seconds, 1)},
    )
    summary = {
        "model": str(model_path), "results": str(results_path), "student": decisions["student"],
        "teacher_params": decisions["teacher_params"], "student_params": decisions["student_params"],
        "epochs_run": decisions["epochs_run"], "stopped": decisions["stopped"],
        "best_validation": decisions["best_validation"], "train_seconds": round(train_seconds, 1),
        "baseline": baseline.to_dict(), "measurements": {"onnxruntime": measured.to_dict()},
        "quality": measured.quality,
        "sanity": decisions.get("sanity"), "status": status, "problem": problem,
    }
    print_summary(out, summary)
    out.emit(summary)
    if problem is not None:
        raise BudgetNotMetError(f"{problem} The model was written to {model_path} but is not fit to use.")


def quality_problem(sanity: dict[str, Any], floor: Any, student: dict[str, Any] | None, teacher: dict[str, Any] | None,
                    decisions: dict[str, Any]) -> str | None:
    """Why the student is not worth using, or None: it missed the sanity bar on the validation
    split (see ``sanity_check`` in techniques/distill), or the --min-quality floor on the test split."""
    if sanity.get("passed") is False:
        why = f"stopped by the time budget after {decisions.get('epochs_run')} epochs" \
            if decisions.get("stopped") == "time_budget" else f"stopped: {decisions.get('stopped')}"
        return (f"The student did not learn: its validation {sanity['metric']} {sanity['final']:.4f} does not pass "
                f"the sanity bar {sanity['bar']:.4f} ({sanity['rule']}; untrained {_text(sanity.get('untrained'))}, "
                f"chance {_text(sanity.get('chance'))}); training {why}. Give it more time (--max-minutes) or epochs.")
    if floor is None or not student:
        return None
    value = student.get("value")
    limit = floor.value if floor.key == "quality" else floor.value * ((teacher or {}).get("value") or 0.0)
    if value is None or value >= limit:
        return None
    return (f"The student's test {student.get('metric')} {value:.4f} is below the --min-quality floor {limit:.4f}; "
            "train longer (--max-minutes, --epochs), choose a larger student or lower the floor.")


def _text(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _own_teacher(path: str, task: Any, hf_task: str | None) -> tuple[Any, Any]:
    """The user's teacher with the example's data; the quality baseline becomes the teacher's own."""
    from compactai.measure import make_runner
    from compactai.models import load_model
    from compactai.tasks import EmbeddingFidelity

    handle = load_model(path, hf_task=hf_task)
    run = handle.run_torch if handle.module is not None else make_runner(handle, "onnxruntime").run
    if isinstance(task.metric, EmbeddingFidelity):
        task.metric = EmbeddingFidelity(run, primary=task.metric.primary)
        task.baseline = 1.0
    else:
        task.baseline = task.evaluate(run).value
    return handle, task


@contextmanager
def _training_bar(out: Output) -> Iterator[Callable[[str], None]]:
    """A rich progress bar (steps, loss, validation) on a terminal; plain lines otherwise."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        def say(message: str) -> None:
            console.print(f"[dim]  {message}[/dim]", highlight=False)

        yield say
        return
    with Progress(TextColumn("Distilling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), console=console) as bar:
        task_id = bar.add_task("starting", total=None)

        def update(message: str) -> None:
            total = getattr(message, "total", 0) or None
            bar.update(task_id, description=str(message), completed=getattr(message, "done", 0) if total else None,
                       total=total)

        yield update


def print_summary(out: Output, summary: dict[str, Any]) -> None:
    teacher, student = summary["baseline"], summary["measurements"]["onnxruntime"]
    rows: list[list[Any]] = []
    tq, sq = teacher.get("quality") or {}, student.get("quality") or {}
    metric = sq.get("metric", "quality")
    rows.append([f"quality ({metric})", tq.get("value"), sq.get("value"), _ratio(sq.get("value"), tq.get("value"))])
    for key in ("cosine_mean", "knn_overlap"):
        if key in sq.get("details", {}):
            rows.append([f"  {key}", tq.get("details", {}).get(key), sq["details"][key], "-"])
    rows.append(["parameters", summary["teacher_params"], summary["student_params"],
                 _ratio(summary["student_params"], summary["teacher_params"])])
    for label, key in (("size (MB)", "size_mb"), ("latency p50 (ms)", "latency_p50_ms"),
                       ("latency p90 (ms)", "latency_p90_ms")):
        rows.append([label, teacher.get(key), student.get(key), _ratio(student.get(key), teacher.get(key))])
    speedup = (teacher["latency_p50_ms"] / student["latency_p50_ms"]) if student.get("latency_p50_ms") else None
    lost = summary.get("problem") is not None
    title = f"Distilled student {summary['student']} vs teacher (ONNX Runtime, batch 1)"
    out.console.print(table(f"{title} -- QUALITY LOST, NOT USABLE" if lost else title,
                            ["figure", "teacher", "student", "student/teacher"], rows))
    if lost:  # no speed-up next to a model that lost its quality
        out.console.print(f"[bold red]quality lost:[/bold red] {summary['problem']}", highlight=False)
        return
    out.console.print(
        f"speed-up (p50): {speedup:.2f}x; trained {summary['epochs_run']} epochs in {summary['train_seconds']:.0f} s "
        f"(stopped: {summary['stopped']}); best validation {summary['best_validation']}; model: {summary['model']}"
        if speedup else f"model: {summary['model']}")


def _ratio(value: Any, reference: Any) -> str:
    if isinstance(value, (int, float)) and isinstance(reference, (int, float)) and reference:
        return f"{value / reference:.3f}"
    return "-"
