"""The `compactai` command line. Each command lives in its own module and registers on ``app``.

Exit codes: 0 ok, 1 internal error, 2 bad input, 3 budget not met. With ``--json`` a
command prints one JSON object on stdout and its human output goes to stderr.
"""

from __future__ import annotations

import importlib
import sys

from compactai.cli._common import app

_COMMAND_MODULES = [  # imported when the entry point runs: each registers its command on ``app``
    "compactai.cli.profile",
    "compactai.cli.quantize",
    "compactai.cli.prune",
    "compactai.cli.distill",
    "compactai.cli.bundle",
    "compactai.cli.repo",
    "compactai.cli.optimize",
    "compactai.cli.serve",
    "compactai.cli.slice",
    "compactai.cli.nas",
    "compactai.cli.bench",
    "compactai.cli.report",
    "compactai.cli.federate",
    "compactai.cli.export",
]


def _load_commands() -> None:
    for module in _COMMAND_MODULES:
        importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    from compactai.cli._common import run_app

    _load_commands()
    code = run_app(list(sys.argv[1:] if argv is None else argv))
    if argv is None:
        sys.exit(code)
    return code


__all__ = ["app", "main"]
