"""NAS over encoder students (issue 21): students built from a teacher's layers and narrowed, and
the distillation search with synchronous successive halving, at tiny sizes (a 4-layer BERT with
hidden size 32 and seeded random weights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compactai.errors import ParameterError
from compactai.models.hf import SentenceEncoder
from compactai.models.load import load_model
from compactai.tasks import EmbeddingFidelity, Split, Task
from compactai.techniques.distill.students import find_layer_stack
from compactai.techniques.nas._train import TrainSettings
from compactai.techniques.nas.encoder import build_encoder, kept_layers, teacher_shape
from compactai.techniques.nas.encoder_search import Reference, measure_student, run_encoder_search
from compactai.techniques.nas.search import OK, PRUNED, NasConfig
from compactai.techniques.nas.space import validate_space

SPACE = validate_space({"family": "encoder", "choices": {
    "layers": [1, 2, 3], "hidden": [32], "heads": [2, 4], "ffn": [16, 32, 64], "init": ["spread", "first", "last"]}})


def tiny_bert():
    """A seeded 4-layer BERT sentence encoder with hidden size 32 (random weights), as a handle."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=16)
    ids = torch.randint(1, 60, (1, 6))
    return load_model(SentenceEncoder(BertModel(config)).eval(), {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                      name="tiny-bert")


@pytest.fixture(scope="module")
def teacher():
    return tiny_bert()


def _task(teacher, n: int = 48, seq: int = 6) -> Task:
    rng = np.random.default_rng(0)

    def split(size: int) -> Split:
        ids = rng.integers(1, 60, size=(size, seq)).astype(np.int64)
        return Split({"input_ids": ids, "attention_mask": np.ones_like(ids)})

    return Task("tiny-text", EmbeddingFidelity(teacher.run_torch), {"train": split(n), "validation": split(16),
                                                                     "test": split(16)}, baseline=1.0, batch_size=16)


def test_students_keep_chosen_teacher_layers_and_its_strongest_heads(teacher) -> None:
    assert kept_layers("spread", 3, 6) == [0, 2, 5]  # the hand-picked MiniLM student
    assert kept_layers("first", 2, 6) == [0, 1] and kept_layers("last", 2, 6) == [4, 5]
    assert teacher_shape(teacher) == {"layers": 4, "hidden": 32, "heads": 4, "ffn": 64}
    student = build_encoder({"family": "encoder", "layers": 2, "hidden": 32, "heads": 2, "ffn": 16, "init": "last"},
                            teacher)
    layers = find_layer_stack(student)[1]
    teacher_layers = find_layer_stack(teacher.module)[1]
    assert len(layers) == 2
    attention = layers[0].attention.self
    assert attention.query.out_features == 16 and layers[0].intermediate.dense.out_features == 16
    # each kept row is one of the teacher's layer-2 rows (copied, not re-initialised)
    source = teacher_layers[2].attention.self.query.weight
    assert all(any(torch.equal(row, other) for other in source) for row in attention.query.weight)
    ids = torch.randint(1, 60, (3, 6))
    out = student(ids, torch.ones_like(ids))
    assert out.shape == teacher.module(ids, torch.ones_like(ids)).shape
    with pytest.raises(ParameterError, match="'hidden' must be 32"):
        build_encoder({"family": "encoder", "layers": 2, "hidden": 16, "heads": 2, "ffn": 16, "init": "first"}, teacher)


def _search(teacher, tmp_path: Path, seed: int = 0, **changes):
    settings = {"budget_ms": 1000.0, "max_trials": 4, "min_epochs": 1, "reduction_factor": 2, "threads": 1,
                "measure_queries": 10, "train": TrainSettings(max_epochs=2, lr=1e-3, batch_size=16, seed=seed)}
    config = NasConfig(**{**settings, **changes})
    return run_encoder_search(SPACE, teacher, _task(teacher), config, tmp_path)


def test_encoder_search_prunes_half_continues_the_rest_from_checkpoint_and_repeats_by_seed(teacher, tmp_path) -> None:
    first = _search(teacher, tmp_path / "a")
    statuses = [c.status for c in first.candidates]
    assert sorted(statuses) == [OK, OK, PRUNED, PRUNED]
    assert first.rungs == [1, 2] and first.fidelity_schedule() == [{"epochs": 1, "candidates": 4},
                                                                   {"epochs": 2, "candidates": 2}]
    pruned = [c for c in first.candidates if c.status == PRUNED]
    kept = [c for c in first.candidates if c.status == OK]
    assert all(c.error is None and c.epochs_run == 1 for c in pruned)  # stopped, not failed
    # continued from the first rung's checkpoint: one history with both epochs, not a fresh run
    assert all([h["epoch"] for h in c.history] == [1, 2] for c in kept)
    assert min(c.validation for c in kept) >= max(c.validation for c in pruned)  # the best half continued
    assert set(first.models) == {c.number for c in kept}
    again = _search(teacher, tmp_path / "b")
    assert [c.spec for c in again.candidates] == [c.spec for c in first.candidates]
    assert [c.status for c in again.candidates] == statuses
    assert [c.validation for c in again.candidates] == [c.validation for c in first.candidates]


def test_encoder_search_over_budget_and_time_limit(teacher, tmp_path) -> None:
    tight = _search(teacher, tmp_path / "tight", budget_ms=1e-6)
    assert [c.status for c in tight.candidates] == ["over_budget"] * 4 and not tight.models
    cut = _search(teacher, tmp_path / "cut", max_minutes=1e-4)
    assert cut.stopped_by == "time" and not cut.models


def test_encoder_space_hidden_must_be_the_teachers(teacher, tmp_path) -> None:
    space = validate_space({"family": "encoder", "choices": {"hidden": [32, 64], "heads": [2]}})
    config = NasConfig(budget_ms=10.0, max_trials=2, train=TrainSettings(max_epochs=2))
    with pytest.raises(ParameterError, match=r"'hidden' sizes \[64\] differ from the teacher's 32"):
        run_encoder_search(space, teacher, _task(teacher), config, tmp_path)


def test_a_second_search_into_the_same_directory_does_not_resume_the_first_ones_checkpoints(teacher, tmp_path) -> None:
    first = _search(teacher, tmp_path)
    assert max(c.epochs_run for c in first.candidates) == 2
    # same seed, so the same students are proposed; a longer schedule must train them anew to its own end
    again = _search(teacher, tmp_path, train=TrainSettings(max_epochs=3, lr=1e-3, batch_size=16, seed=0))
    kept = [c for c in again.candidates if c.status == OK]
    assert kept and all(c.epochs_run == 3 and c.history[0]["epoch"] == 1 for c in kept)


def test_a_candidate_is_timed_relative_to_the_reference_and_scaled_by_its_figures(teacher) -> None:
    """measure_student times the student interleaved with the reference and reports its ratio to the
    reference times the reference's figures: the teacher's own copy, against a reference said to take
    100 / 1000 ms, comes out near 100 / 1000 ms (a ratio near 1), not near its own few milliseconds."""
    import copy

    measured = Reference.measure(teacher, threads=1, queries=50)
    assert 0 < measured.p50_ms <= measured.p90_ms
    scaled = Reference(measured.handle, 100.0, 1000.0)
    p50, p90 = measure_student(copy.deepcopy(teacher.module), teacher, threads=1, queries=50, reference=scaled)
    assert 50 < p50 < 200 and 500 < p90 < 2000


def test_students_of_one_shape_are_timed_once_and_share_the_figure(teacher, tmp_path, monkeypatch) -> None:
    """Which teacher layers a student copies does not change its graph, so three students that differ
    only in their init are timed once: the same shape cannot be admitted once and refused once by noise."""
    import compactai.techniques.nas.encoder_search as encoder_search

    timed = []
    real = encoder_search.measure_student
    monkeypatch.setattr(encoder_search, "measure_student", lambda *a, **k: timed.append(1) or real(*a, **k))
    space = validate_space({"family": "encoder", "choices": {
        "layers": [2], "hidden": [32], "heads": [2], "ffn": [16], "init": ["spread", "first", "last"]}})
    config = NasConfig(budget_ms=1000.0, max_trials=3, min_epochs=1, reduction_factor=3, threads=1,
                       measure_queries=10, train=TrainSettings(max_epochs=1, lr=1e-3, batch_size=16))
    result = run_encoder_search(space, teacher, _task(teacher), config, tmp_path)
    assert sorted(c.spec["init"] for c in result.candidates) == ["first", "last", "spread"]
    assert len(timed) == 1
    assert len({(c.latency_p50_ms, c.latency_p90_ms) for c in result.candidates}) == 1
