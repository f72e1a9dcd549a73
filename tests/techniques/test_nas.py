"""NAS: spaces as data (seeded sampling, validation of declared spaces), the cached latency table,
and the multi-fidelity search (limits, best so far, pruned recorded as pruned). Tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compactai.errors import ParameterError
from compactai.tasks import Accuracy, Split, Task
from compactai.techniques.nas._train import TrainSettings
from compactai.techniques.nas.build import build_model, parts_of
from compactai.techniques.nas.predictor import LatencyTable, predictor_accuracy
from compactai.techniques.nas.search import PRUNED, NasConfig, run_search
from compactai.techniques.nas.space import (
    builtin_space,
    load_space,
    random_choose,
    sample_spec,
    validate_space,
)

IMAGE = {"input": {"name": "image", "shape": [1, 16, 16]}, "classes": 10}
FEATURES = {"input": {"name": "x", "shape": [12]}, "classes": 6}


@pytest.mark.parametrize("family", ["cnn", "mlp", "encoder"])
def test_sampling_is_reproducible_by_seed(family: str) -> None:
    space = validate_space(builtin_space(family))
    shape = IMAGE if family == "cnn" else FEATURES
    first = [sample_spec(space, random_choose(seed), shape) for seed in range(8)]
    again = [sample_spec(space, random_choose(seed), shape) for seed in range(8)]
    assert first == again
    assert len({json.dumps(spec, sort_keys=True) for spec in first}) > 1  # the seed matters
    if family != "encoder":
        one, two = build_model(first[3], seed=5), build_model(first[3], seed=5)
        assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values(), strict=True))
        rows = torch.randn(2, *shape["input"]["shape"])
        assert one.eval()(rows).shape == (2, shape["classes"])


def test_spec_rebuilds_the_architecture_it_describes() -> None:
    spec = sample_spec(validate_space(builtin_space("cnn")), random_choose(3), IMAGE)
    rebuilt = build_model(json.loads(json.dumps(spec)))  # through JSON, as architecture.json stores it
    assert sum(p.numel() for p in rebuilt.parameters()) == sum(p.numel() for p in build_model(spec).parameters())
    assert len(parts_of(spec)) == 2 + sum(stage["depth"] for stage in spec["stages"])


@pytest.mark.parametrize(("space", "message"), [
    ({"family": "rnn", "choices": {}}, r"'family' of .* must be one of cnn, mlp, encoder; got 'rnn'"),
    ({"family": "cnn", "choices": {"kernels": [3]}}, r"Unknown choice 'kernels' .* known choices: stages"),
    ({"family": "cnn", "choices": {"kernel": [3, 4]}}, r"'kernel' .* kernel sizes 3, 5 or 7; got 4 in \[3, 4\]"),
    ({"family": "mlp", "choices": {"hidden": []}}, r"'hidden' .* non-empty list of whole numbers"),
    ({"family": "mlp", "choices": {"dropout": [1.5]}}, r"'dropout' .* numbers in \[0, 1\); got 1.5"),
    ({"family": "encoder", "choices": {"hidden": [100], "heads": [3]}}, r"hidden % heads == 0"),
    ({"family": "cnn", "choice": {}}, r"unknown keys \['choice'\]"),
])
def test_declared_space_errors_name_the_problem(tmp_path: Path, space: dict, message: str) -> None:
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"nas": {"space": space}}))
    with pytest.raises(ParameterError, match=message):
        load_space(str(path))


def test_declared_space_file_fills_defaults_and_bad_json_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("family: cnn\nchoices:\n  kernel: [5]\n  stages: [2]\n")
    space = load_space(str(path))
    assert space["choices"]["kernel"] == [5] and space["choices"]["se"] == [False, True]
    spec = sample_spec(space, random_choose(0), IMAGE)
    assert [stage["kernel"] for stage in spec["stages"]] == [5, 5]
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ParameterError, match="is not valid JSON/YAML"):
        load_space(str(broken))


def _mlp_spec(hidden: list[int]) -> dict:
    return {"family": "mlp", **FEATURES, "hidden": hidden, "activation": "relu", "dropout": 0.0}


def test_latency_table_is_measured_once_and_cached_per_thread_count(tmp_path: Path) -> None:
    table = LatencyTable(1, tmp_path, queries=20)
    predicted = table.predict(_mlp_spec([16]))
    assert predicted > 0 and table.measured == 3  # the session overhead and two linear layers
    assert table.path.is_file() and table.path.parent == tmp_path / "nas-latency"
    again = LatencyTable(1, tmp_path, queries=20)
    assert again.predict(_mlp_spec([16])) == predicted and again.measured == 0
    assert LatencyTable(2, tmp_path).path != table.path  # another thread count is another table


def test_predictor_accuracy_figures() -> None:
    figures = predictor_accuracy([1.0, 2.0, 3.0, 4.0], [1.1, 1.9, 3.3, 4.4])
    assert figures["spearman"] == 1.0 and figures["mean_relative_error"] == pytest.approx((0.1 / 1.1 * 3 + 0.1 / 1.9) / 4, abs=1e-4)
    assert predictor_accuracy([1.0], [1.0])["spearman"] is None


def _blobs_task(seed: int = 0) -> Task:
    """Six Gaussian blobs in 12 dimensions: easy for a wide MLP, hard through a 1-unit bottleneck."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, size=(6, 12))

    def split(rows: int) -> Split:
        labels = rng.integers(0, 6, size=rows)
        return Split({"x": (centres[labels] + rng.normal(0, 1, size=(rows, 12))).astype(np.float32)}, labels)

    return Task(name="blobs", metric=Accuracy(), splits={"train": split(240), "validation": split(120),
                                                         "test": split(120)})


def _config(**changes: object) -> NasConfig:
    settings = {"budget_ms": 1000.0, "max_trials": 3, "min_epochs": 1, "reduction_factor": 2, "threads": 1,
                "measure_queries": 20, "train": TrainSettings(max_epochs=2, batch_size=32, lr=1e-2)}
    return NasConfig(**{**settings, **changes})  # type: ignore[arg-type]


def test_search_stops_at_max_trials_and_keeps_the_best(tmp_path: Path) -> None:
    space = validate_space({"family": "mlp", "choices": {"layers": [1], "hidden": [4, 32], "dropout": [0.0]}})
    outcome = run_search(space, _blobs_task(), _config(max_trials=3), LatencyTable(1, tmp_path, queries=20))
    assert outcome.stopped_by == "max_trials" and len(outcome.candidates) == 3
    best = outcome.eligible(1000.0)[0]
    trained = [c for c in outcome.candidates if c.validation is not None and c.status != PRUNED]
    assert best.validation == max(c.validation for c in trained)  # type: ignore[type-var]
    assert best.number in outcome.models and best.latency_p90_ms is not None


def test_search_stops_at_its_time_limit(tmp_path: Path) -> None:
    space = validate_space({"family": "mlp", "choices": {"layers": [1], "hidden": [4]}})
    outcome = run_search(space, _blobs_task(), _config(max_trials=50, max_minutes=1e-9),
                         LatencyTable(1, tmp_path, queries=20))
    assert outcome.stopped_by == "time" and len(outcome.candidates) < 50


def test_a_stopped_candidate_is_recorded_as_pruned_not_failed(tmp_path: Path) -> None:
    space = validate_space({"family": "mlp", "choices": {"layers": [1], "hidden": [1, 64], "dropout": [0.0, 0.1]}})
    outcome = run_search(space, _blobs_task(), _config(max_trials=4, train=TrainSettings(max_epochs=4, batch_size=32)),
                         LatencyTable(1, tmp_path, queries=20))
    counts = outcome.counts()
    pruned = [c for c in outcome.candidates if c.status == PRUNED]
    assert pruned, counts
    assert "failed" not in counts
    assert all(c.error is None and 0 < c.epochs_run < 4 for c in pruned)
    assert outcome.fidelity_schedule()[0] == {"epochs": 1, "candidates": 4}


def test_rejected_by_the_predictor_before_training(tmp_path: Path) -> None:
    space = validate_space({"family": "mlp", "choices": {"layers": [1], "hidden": [8]}})
    outcome = run_search(space, _blobs_task(), _config(budget_ms=1e-6, max_trials=1, audit=1),
                         LatencyTable(1, tmp_path, queries=20))
    (candidate,) = outcome.candidates
    assert candidate.status == "rejected" and not candidate.history and candidate.number not in outcome.models
    assert candidate.latency_p50_ms is not None  # audited: measured to check the predictor, not trained
