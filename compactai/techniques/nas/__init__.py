"""Hardware-aware neural architecture search: search spaces as data (``space.py``), models rebuilt
from specs (``build.py``), the per-part ONNX Runtime latency table (``predictor.py``) and the
multi-fidelity search on Optuna (``search.py``). ``compactai nas`` is the command; docs/nas.md."""

from __future__ import annotations

from compactai.techniques.nas.build import build_model
from compactai.techniques.nas.predictor import LatencyTable, predictor_accuracy
from compactai.techniques.nas.search import NasConfig, NasOutcome, run_search
from compactai.techniques.nas.space import (
           BUILTIN_SPACES,
           load_space,
           random_choose,
           sample_spec,
           validate_space,
)

__all__ = ["BUILTIN_SPACES", "LatencyTable", "NasConfig", "NasOutcome", "build_model", "load_space",
           "predictor_accuracy", "random_choose", "run_search", "sample_spec", "validate_space"]
