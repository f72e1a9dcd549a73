"""Energy per inference: RAPL when the kernel exposes it, otherwise an estimate from CPU time."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RAPL_ROOT = Path("/sys/class/powercap")
DEFAULT_CORE_WATTS = 10.0  # a typical server core under load; override with --core-watts


@dataclass
class EnergyEstimate:
    millijoules_per_inference: float
    method: str  # "rapl" | "estimated"
    formula: str


def _rapl_files() -> list[Path]:
    if not RAPL_ROOT.exists():
        return []
    files = []
    for zone in sorted(RAPL_ROOT.glob("intel-rapl:*")):
        if zone.name.count(":") == 1 and (zone / "energy_uj").exists():
            files.append(zone / "energy_uj")
    return files


def read_rapl_uj() -> int | None:
    """Total package energy counter in microjoules, or None when RAPL is absent or unreadable."""
    files = _rapl_files()
    if not files:
        return None
    try:
        return sum(int(f.read_text()) for f in files)
    except (OSError, ValueError):
        return None


def measure_energy(
    run_queries: Callable[[], tuple[int, float]],
    cpu_seconds: float | None = None,
    queries: int | None = None,
    core_watts: float = DEFAULT_CORE_WATTS,
) -> EnergyEstimate:
    """Energy per inference.

    With RAPL, ``run_queries()`` is run between two counter reads and must return
    (queries run, CPU seconds used). Without RAPL the estimate is CPU seconds per query
    times ``core_watts``, from the given figures (or from running ``run_queries``).
    """
    before = read_rapl_uj()
    if before is not None:
        count, _ = run_queries()
        after = read_rapl_uj()
        if after is not None and after >= before and count:
            return EnergyEstimate((after - before) / 1e3 / count, "rapl", "RAPL package energy delta / queries")
    if cpu_seconds is None or not queries:
        queries, cpu_seconds = run_queries()
    per_query = cpu_seconds / max(queries, 1)
    return EnergyEstimate(
        per_query * core_watts * 1e3,
        "estimated",
        f"cpu_seconds_per_inference ({per_query * 1e3:.3f} ms) x {core_watts:g} W per busy core",
    )
