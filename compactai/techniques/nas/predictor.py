"""Latency predictor: a per-part latency table measured on ONNX Runtime, summed per architecture.

Each distinct part (stem, block, head, linear layer, with its exact shapes) is exported alone and
timed once at batch 1 with the threads the search uses; the table is a JSON file under the user
cache, one per CPU model, thread count and ONNX Runtime version, so a second search on this
machine measures nothing it has seen. Every standalone run pays the session's fixed cost once,
so that cost (timed on a trivial model) is taken off each part and added back once per model.

The sum is a *prediction*: it misses fusion across parts and cache effects. The search uses it
only to skip candidates that cannot fit the budget before they are exported and trained; every
candidate that is trained is measured whole, and the report gives the predictor's Spearman rank
correlation and mean relative error against those measurements.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compactai.measure import make_runner, measure_latency
from compactai.measure.environment import cpu_info, versions
from compactai.models.load import load_model
from compactai.techniques.nas.build import build_part, part_input_shape, parts_of

log = logging.getLogger(__name__)
OVERHEAD_KEY = "__session_overhead__"


def default_cache_dir() -> Path:
    """$COMPACTAI_CACHE_DIR or the user cache dir (where the examples cache their weights too)."""
    env = os.environ.get("COMPACTAI_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("compactai"))


def table_path(cache_dir: Path, threads: int) -> Path:
    """The table file of this CPU model, thread count and ONNX Runtime version."""
    cpu = re.sub(r"[^A-Za-z0-9]+", "-", str(cpu_info()["model"])).strip("-")[:80] or "unknown-cpu"
    ort = versions().get("onnxruntime", "unknown")
    return cache_dir / "nas-latency" / f"{cpu}-t{threads}-ort{ort}.json"


class LatencyTable:
    """Part key -> median batch-1 milliseconds on ONNX Runtime, measured on first use and cached."""

    def __init__(self, threads: int, cache_dir: Path | None = None, queries: int = 60) -> None:
        self.threads = threads
        self.path = table_path(cache_dir or default_cache_dir(), threads)
        self.queries = queries
        self.entries: dict[str, float] = self._read()
        self.measured = 0  # parts timed by this instance (0 when the cache had them all)

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return {str(k): float(v) for k, v in data.get("parts", {}).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _save(self) -> None:
        """Merge into the file under a lock: searches running side by side share one table."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            merged = {**self._read(), **self.entries}
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"cpu": cpu_info(), "threads": self.threads, "runtime": "onnxruntime",
                                       "unit": "ms (median, batch 1)", "parts": merged}, indent=1, sort_keys=True))
            tmp.replace(self.path)
            self.entries = merged

    def part_ms(self, part: dict[str, Any]) -> float:
        """The table's figure for ``part``, timing it now if the table does not have it."""
        key = json.dumps(part, sort_keys=True)
        if key not in self.entries:
            self.entries[key] = self._time(build_part(part), part_input_shape(part))
            self.measured += 1
            self._save()
        return self.entries[key]

    def overhead_ms(self) -> float:
        """The fixed cost of one ONNX Runtime call on a trivial model (paid once per model)."""
        if OVERHEAD_KEY not in self.entries:
            self.entries[OVERHEAD_KEY] = self._time(torch.nn.ReLU(), [8])
            self.measured += 1
            self._save()
        return self.entries[OVERHEAD_KEY]

    def _time(self, module: torch.nn.Module, shape: list[int]) -> float:
        module.eval()
        example = torch.randn(1, *shape)
        handle = load_model(module, {"x": example}, name="nas-part", output_names=["y"])
        with tempfile.TemporaryDirectory(prefix="compactai-nas-part-") as tmp:
            onnx_handle = handle.to_onnx(Path(tmp) / "part.onnx", parity=False)
            runner = make_runner(onnx_handle, "onnxruntime", self.threads)
            stats = measure_latency(runner, {"x": example.numpy()}, min_queries=self.queries, min_seconds=0.05, warmup=10)
        return stats.p50_ms

    def predict(self, spec: dict[str, Any]) -> float:
        """Predicted batch-1 latency (ms) of the model of ``spec``: the parts' figures without the
        per-call overhead, plus that overhead once."""
        overhead = self.overhead_ms()
        return overhead + sum(max(self.part_ms(part) - overhead, 0.0) for part in parts_of(spec))


def predictor_accuracy(predicted: list[float], measured: list[float]) -> dict[str, Any]:
    """Spearman rank correlation and mean relative error of predictions against measurements."""
    from scipy.stats import spearmanr

    pairs = [(p, m) for p, m in zip(predicted, measured, strict=True) if m and m > 0]
    if len(pairs) < 3:
        return {"candidates": len(pairs), "spearman": None, "mean_relative_error": None}
    p, m = np.array([x[0] for x in pairs]), np.array([x[1] for x in pairs])
    rho = spearmanr(p, m).statistic
    return {"candidates": len(pairs), "spearman": None if np.isnan(rho) else round(float(rho), 4),
            "mean_relative_error": round(float(np.mean(np.abs(p - m) / m)), 4)}


__all__ = ["LatencyTable", "default_cache_dir", "predictor_accuracy", "table_path"]
