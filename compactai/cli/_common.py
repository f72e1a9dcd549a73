"""Shared CLI pieces: the typer app, error handling, JSON output, progress and tables."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
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
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import contextlib

    # With --json, stdout carries exactly one JSON object: libraries that print (ONNX Runtime's
    # calibrators do) are sent to stderr instead.
    redirect = contextlib.redirect_stdout(sys.stderr) if "--json" in argv else contextlib.nullcontext()
    try:
        with redirect:
            returned = app(argv, standalone_mode=False)  # click returns typer.Exit's code in this mode
    except CompactAIError as exc:
        if debug:
            raise
        Console(stderr=True).print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        return int(code or 0)
    except Exception as exc:  # click usage errors and anything unexpected
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return 2
        if isinstance(exc, click.exceptions.Abort):
            return 130
        if debug:
            raise
        Console(stderr=True).print(
            f"[bold red]internal error:[/bold red] {type(exc).__name__}: {exc} (re-run with --debug for the traceback)",
            highlight=False, soft_wrap=True,
        )
        return 1
    return returned if isinstance(returned, int) else 0


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

    return load_model(path, hf_task=hf_task), None, {"path": str(path)}


@app.callback()
def _root() -> None:
    """compactai: scale models down to run locally. Add --debug to any command for tracebacks."""
