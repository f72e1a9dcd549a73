"""Budgets: what the scaled-down model must fit, parsed from ``"latency_p90_ms<=2,size_mb<=10"``.

Keys map to measured figures; ``quality`` is absolute on the task metric and
``quality_relative`` is a fraction of the uncompressed baseline.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from compactai.errors import BadInputError

# budget key -> (Measurement field or special name, allowed operator, unit)
KEYS: dict[str, tuple[str, str, str]] = {
    "latency_p50_ms": ("latency_p50_ms", "<=", "ms"),
    "latency_p90_ms": ("latency_p90_ms", "<=", "ms"),
    "latency_p99_ms": ("latency_p99_ms", "<=", "ms"),
    "throughput": ("throughput_items_per_s", ">=", "items/s"),
    "size_mb": ("size_mb", "<=", "MB"),
    "memory_mb": ("peak_memory_mb", "<=", "MB"),
    "energy_mj": ("energy_mj", "<=", "mJ"),
    "quality": ("quality", ">=", ""),
    "quality_relative": ("quality_relative", ">=", "x baseline"),
}
_TERM = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|<|>|=)\s*([-+0-9.eE]+)\s*(x?)\s*$")
DEFAULT_BUDGET = "latency_p90_ms<=0.5x,size_mb<=0.25x"
DEFAULT_MIN_QUALITY = "0.99"


@dataclass(frozen=True)
class Constraint:
    key: str
    op: str
    value: float
    relative: bool = False  # "0.5x": a multiple of the original model's figure, resolved after measuring it

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value:g}{'x' if self.relative else ''}"


@dataclass
class Check:
    """One constraint checked against one candidate's figures."""

    constraint: Constraint
    actual: float | None
    ok: bool
    slack: float  # how far inside (>= 0) or outside (< 0) the limit, relative to the limit

    def describe(self) -> str:
        unit = KEYS[self.constraint.key][2]
        if self.actual is None:
            return f"{self.constraint.key} was not measured"
        if self.ok:
            return f"{self.constraint.key} {self.actual:.4g}{unit and ' ' + unit} meets {self.constraint}"
        return (f"{self.constraint.key} is {self.actual:.4g}{unit and ' ' + unit}, "
                f"{abs(self.slack) * 100:.1f}% beyond the limit {self.constraint}")


@dataclass
class Budget:
    """Constraints a candidate must satisfy (all of them)."""

    constraints: list[Constraint] = field(default_factory=list)

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.constraints) or "(none)"

    @property
    def keys(self) -> set[str]:
        return {c.key for c in self.constraints}

    def to_dict(self) -> dict[str, Any]:
        return {"constraints": [{"key": c.key, "op": c.op, "value": c.value} for c in self.constraints],
                "text": str(self)}

    def resolve(self, baseline: dict[str, Any]) -> Budget:
        """Relative limits ("0.5x") turned into absolute ones using the original model's figures."""
        resolved = []
        for c in self.constraints:
            if c.relative:
                figure = baseline.get(KEYS[c.key][0])
                if figure is None:
                    raise BadInputError(f"Budget term '{c}' is relative but the original's {c.key} was not measured.")
                c = Constraint(c.key, c.op, round(float(figure) * c.value, 6))
            resolved.append(c)
        return Budget(resolved)

    def check(self, figures: dict[str, Any]) -> list[Check]:
        """Each constraint against ``figures`` (a Measurement dict plus quality/quality_relative)."""
        checks = []
        for c in self.constraints:
            actual = figures.get(KEYS[c.key][0])
            if actual is None:
                checks.append(Check(c, None, False, float("-inf")))
                continue
            limit = c.value if c.value != 0 else 1e-12
            slack = (limit - actual) / abs(limit) if c.op == "<=" else (actual - limit) / abs(limit)
            checks.append(Check(c, float(actual), slack >= 0, float(slack)))
        return checks

    def satisfied(self, figures: dict[str, Any]) -> bool:
        return all(ch.ok for ch in self.check(figures))

    def misses_quality(self, figures: dict[str, Any]) -> bool:
        """True when a quality constraint (quality, quality_relative) is not met or not measured."""
        return any(not ch.ok for ch in self.check(figures) if ch.constraint.key.startswith("quality"))

    def violation(self, figures: dict[str, Any]) -> float:
        """Sum of relative overshoots (0 when within budget): distance used to rank near misses."""
        return float(sum(-min(ch.slack, 0.0) if ch.actual is not None else 1e6 for ch in self.check(figures)))


def parse_budget(text: str | None, min_quality: str | float | None = None) -> Budget:
    """Parse ``"latency_p90_ms<=2,size_mb<=10"`` plus ``min_quality`` ("0.99" relative to the
    baseline, or "abs:0.985" absolute on the metric). A limit ending in ``x`` ("0.5x") is a
    multiple of the original model's measured figure."""
    constraints: list[Constraint] = []
    for term in (text or "").split(","):
        if not term.strip():
            continue
        match = _TERM.match(term)
        if not match:
            raise BadInputError(
                f"Cannot read budget term '{term.strip()}'; write KEY<=NUMBER or KEY>=NUMBER, e.g. "
                "'latency_p90_ms<=2,size_mb<=10'."
            )
        key, op, number, times = match.groups()
        if key not in KEYS:
            raise BadInputError(f"Unknown budget key '{key}'; known keys: {', '.join(KEYS)}.")
        op = {"<": "<=", ">": ">=", "=": KEYS[key][1]}.get(op, op)
        if op != KEYS[key][1]:
            raise BadInputError(f"Budget key '{key}' takes '{KEYS[key][1]}' (got '{op}'), e.g. '{key}{KEYS[key][1]}{number}'.")
        try:
            value = float(number)
        except ValueError:
            raise BadInputError(f"Budget term '{term.strip()}' needs a number after '{op}'.") from None
        if not math.isfinite(value):
            raise BadInputError(f"Budget term '{term.strip()}' must have a finite limit; drop the term for no limit.")
        if value < 0 or (value == 0 and op == "<="):
            raise BadInputError(f"Budget term '{term.strip()}' must have a positive limit.")
        if times and key.startswith("quality"):
            raise BadInputError(f"Budget term '{term.strip()}': write quality limits with --min-quality instead.")
        constraints.append(Constraint(key, op, value, relative=bool(times)))
    if min_quality is not None and str(min_quality).strip() != "":
        constraints.append(parse_min_quality(min_quality))
    seen: set[str] = set()
    for c in constraints:
        if c.key in seen:
            raise BadInputError(f"Budget key '{c.key}' is given twice; keep one.")
        seen.add(c.key)
    return Budget(constraints)


def parse_min_quality(value: str | float) -> Constraint:
    text = str(value).strip()
    absolute = text.startswith("abs:")
    try:
        number = float(text[4:] if absolute else text)
    except ValueError:
        raise BadInputError(
            f"--min-quality must be a number (relative to the baseline, e.g. 0.99) or 'abs:NUMBER'; got '{text}'."
        ) from None
    if not math.isfinite(number):
        raise BadInputError(f"--min-quality must be a finite number; got '{text}'. Omit it to keep the default 0.99.")
    if absolute:
        return Constraint("quality", ">=", number)
    if not 0 < number <= 1.5:
        raise BadInputError(
            f"--min-quality {number:g} is read as a fraction of the baseline and must be in (0, 1.5]; "
            f"for an absolute metric value write 'abs:{number:g}'."
        )
    return Constraint("quality_relative", ">=", number)
