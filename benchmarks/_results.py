"""Results files that several benchmarks write: each owns one section and keeps the others."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_section(path: Path, section: str, report: dict[str, Any]) -> None:
    """Set ``section`` of the JSON file at ``path`` to ``report``, keeping the other sections as they are."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results[section] = report
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
