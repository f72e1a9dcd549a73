"""Shared CLI pieces: the typer app, error handling, JSON output, progress and tables."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from compactai.errors import CompactAIError
from compactai.results import to_jsonable

app = typer.Typer(
    name="compactai",
    help="Scale trained models down to run locally within a measured budget "
    "(pruning, quantization, distillation), measured on this machine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@dataclass
class Output:
    """Where a command writes: JSON on stdout with --json, people-facing text on stderr."""

    json_mode: bool
    debug: bool = False

    @property
    def console(self) -> Console:
        return Console(stderr=True) if self.json_mode else Console()

    def emit(self, data: dict[str, Any]) -> None:
        if self.json_mode:
            out = sys.__stdout__ or sys.stdout  # the real stdout: run_app sends stray prints to stderr
            out.write(json.dumps(to_jsonable(data)) + "\n")
            out.flush()

    @contextmanager
    def progress(self, what: str) -> Iterator[Any]:
        """A spinner on stderr whose text the callback updates: ``with out.progress("x") as say: say("y")``."""
        console = Console(stderr=True)
        if not console.is_terminal:
            console.print(f"[dim]{what}...[/dim]")

            def say(message: str) -> None:
                console.print(f"[dim]  {message}[/dim]")

            yield say
            return
        with console.status(what) as status:
            yield lambda message: status.update(f"{what}: {message}")


# One declaration of --hf-task, shared by every command that takes a model path.
HF_TASK_OPTION: Any = typer.Option(
    None, "--hf-task", help="Hugging Face directory: load as embedding, sequence-classification, "
    "token-classification or causal-lm instead of its declared architecture.",
)
# --json and --example as most commands declare them (a command whose option means more says so itself).
JSON_OPTION: Any = typer.Option(False, "--json", help="Print one JSON object on stdout.")
EXAMPLE_OPTION: Any = typer.Option(None, "--example", "-e", help="Built-in example: digits or minilm.")


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int) and abs(value) >= 10_000:
        return f"{value:,}"
    return str(value)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    result = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        result.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        result.add_row(*[fmt(v) for v in row])
    return result


def run_app(argv: list[str]) -> int:
    """Run the typer app, turning compactai errors into one line and an exit code."""
    debug = "--debug" in argv or os.environ.get("COMPACTAI_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    log_path = setup_logging(debug)
    # With --json, stdout carries exactly one JSON object: libraries that print (ONNX Runtime's
    # calibrators do) are sent to stderr instead.
    redirect = contextlib.redirect_stdout(sys.stderr) if "--json" in argv else contextlib.nullcontext()
    try:
        with redirect:
            returned = app(argv, standalone_mode=False)  # click returns typer.Exit's code in this mode
    except CompactAIError as exc:
        if debug:
            raise
        # escaped: a message may hold brackets rich would eat as markup, e.g. pip's 'compactai[openvino]'
        Console(stderr=True).print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        return int(code or 0)
    except _click_errors() as exc:  # usage errors: unknown option, missing or unparsable value
        exc.show()  # the usage line and "Error: ..."
        return 2
    except _abort_errors():
        return 130
    except MemoryError:
        if debug:
            raise
        Console(stderr=True).print(
            "[bold red]error:[/bold red] out of memory: the model or the data asks for more memory than this machine "
            "can give; check the declared input shapes and tensor sizes (re-run with --debug for the traceback)",
            highlight=False, soft_wrap=True,
        )
        return 2
    except Exception as exc:
        if debug:
            raise
        Console(stderr=True).print(
            f"[bold red]internal error:[/bold red] {type(exc).__name__}: {exc} (re-run with --debug for the traceback; "
            f"what the libraries logged is in {log_path})",
            highlight=False, soft_wrap=True,
        )
        return 1
    return returned if isinstance(returned, int) else 0


def log_file() -> Path:
    """Where a command's log goes: $COMPACTAI_LOG, else compactai/last-run.log in the user's cache."""
    if os.environ.get("COMPACTAI_LOG"):
        return Path(os.environ["COMPACTAI_LOG"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "compactai" / "last-run.log"


def setup_logging(debug: bool) -> Path:
    """compactai's own warnings go to stderr. What the libraries say (ONNX Runtime's "please consider
    pre-processing" and its tensor-type dumps, torch deprecation warnings) goes to the log file
    only, and to stderr as well with --debug. Returns the log file's path."""
    formatter = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    logging.captureWarnings(True)  # warnings.warn -> the "py.warnings" logger
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    path = log_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        to_file: logging.Handler = logging.FileHandler(path, mode="w", delay=True, encoding="utf-8")
    except OSError:  # a read-only home: the libraries' messages are dropped rather than shown
        to_file = logging.NullHandler()
    to_file.setFormatter(formatter)
    root.addHandler(to_file)
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setFormatter(formatter)
    if not debug:
        to_stderr.setLevel(logging.WARNING)
        to_stderr.addFilter(lambda record: record.name.startswith("compactai"))
    root.addHandler(to_stderr)
    with contextlib.suppress(ImportError):  # ONNX Runtime's C++ logger writes to stderr itself
        import onnxruntime

        onnxruntime.set_default_logger_severity(0 if debug else 3)
    return path


def _click_errors() -> tuple[type[Any], ...]:
    """Click's usage-error base class as typer runs it: typer >= 0.2x vendors click as
    ``typer._click`` (whose exceptions are not ``click.ClickException``), older typer uses click
    itself. Both are caught, so a typer upgrade either way keeps usage errors at exit 2."""
    types: list[type[Any]] = []
    with contextlib.suppress(ImportError):
        from typer._click.exceptions import ClickException as VendoredClickException

        types.append(VendoredClickException)
    with contextlib.suppress(ImportError):
        import click

        types.append(click.exceptions.ClickException)
    return tuple(types)


def _abort_errors() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [typer.Abort]
    with contextlib.suppress(ImportError):
        import click

        types.append(click.exceptions.Abort)
    return tuple(types)


def resolve_model(
    path: str | None, example: str | None, progress: Any = None, hf_task: str | None = None
) -> tuple[Any, Any, dict[str, Any]]:
    """(handle, task or None, info) from a model path or a built-in example name; ``hf_task``
    overrides the architecture a Hugging Face directory declares."""
    from compactai.errors import BadInputError

    if (path is None) == (example is None):
        raise BadInputError("Give either a model PATH or --example NAME (digits, minilm), not both or neither.")
    if example is not None:
        from compactai.examples import load_example

        loaded = load_example(example, progress=progress)
        info = {k: v for k, v in loaded.info.items() if k != "texts"}
        return loaded.handle, loaded.task, {"example": example, "description": loaded.description, **info}
    from compactai.models import load_model
    from compactai.models.bounds import check_onnx_sizes

    try:
        is_onnx = Path(path).is_file() and Path(path).suffix.lower() == ".onnx"  # type: ignore[arg-type]
    except OSError as exc:  # e.g. ENAMETOOLONG
        raise BadInputError(f"Cannot use the model path {str(path)[:200]}...: {exc.strerror}.") from None
    if is_onnx:
        check_onnx_sizes(path)  # type: ignore[arg-type]  # before example inputs are allocated
    return load_model(path, hf_task=hf_task), None, {"path": str(path)}


def check_output_dir(path: Path | None, flag: str = "-o") -> None:
    """Refuse an output directory that names an existing file (or cannot be a path here), before any
    work, so nothing the user already has is overwritten or left half-written."""
    from compactai.errors import BadInputError

    if path is None:
        return
    try:
        is_file = path.exists() and not path.is_dir()
    except OSError as exc:  # e.g. ENAMETOOLONG
        raise BadInputError(f"Cannot use {flag} {str(path)[:200]}: {exc.strerror}; choose a shorter path.") from None
    if is_file:
        raise BadInputError(f"{flag} {path} exists and is not a directory; choose a new directory name "
                            "(it would be created) or move the file away.")


def check_time_limit(seconds: float | None, flag: str = "--time-limit") -> None:
    """A time limit is a positive, finite number of seconds (or absent)."""
    from compactai.errors import ParameterError

    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise ParameterError(f"{flag} must be a positive number of seconds; got {seconds}. Omit it for no limit.")


def task_from_data(path: Path, handle: Any) -> Any:
    """The task of ``--data FILE.npz`` for ``handle`` (see ``Task.from_npz``), judged against the
    model as ONNX Runtime runs it (a runtime's own file, e.g. OpenVINO IR: as that runtime runs it)."""
    from compactai.measure import make_runner
    from compactai.tasks import Task, output_kind

    runtime = "onnxruntime" if handle.framework in ("onnx", "torch") else handle.framework
    return Task.from_npz(path, handle.inputs, make_runner(handle, runtime).run, kind=output_kind(handle))


@app.callback()
def _root() -> None:
    """compactai: scale models down to run locally. Add --debug to any command for tracebacks."""
