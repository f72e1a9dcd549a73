from __future__ import annotations

import numpy as np
import pytest

from compactai.tasks import (
    Accuracy,
    CallableMetric,
    EmbeddingFidelity,
    Quality,
    Split,
    Task,
    knn_overlap,
    mean_pool,
    trim_padding,
)


def test_accuracy_counts_argmax_hits():
    split = Split({"x": np.zeros((4, 2), np.float32)}, np.array([0, 1, 1, 0]))
    logits = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], np.float32)
    value, _ = Accuracy().score(lambda feeds: [logits[: len(feeds["x"])]], split, batch_size=8)
    assert value == pytest.approx(0.75)


def test_mean_pool_ignores_padding():
    hidden = np.array([[[1.0, 1.0], [3.0, 5.0], [100.0, 100.0]]])
    mask = np.array([[1, 1, 0]])
    assert np.allclose(mean_pool(hidden, mask), [[2.0, 3.0]])


def test_trim_padding_cuts_shared_pad_columns():
    feeds = {"input_ids": np.array([[5, 6, 0, 0], [7, 0, 0, 0]]), "attention_mask": np.array([[1, 1, 0, 0], [1, 0, 0, 0]])}
    trimmed = trim_padding(feeds)
    assert trimmed["input_ids"].shape == (2, 2)


def test_embedding_fidelity_identical_and_perturbed():
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((30, 5, 8)).astype(np.float32)
    split = Split({"input_ids": np.ones((30, 5), np.int64), "attention_mask": np.ones((30, 5), np.int64)})
    index = {"i": 0}

    def reference(feeds):
        start = index["i"]
        index["i"] = (start + len(feeds["input_ids"])) % 30
        return [hidden[start : start + len(feeds["input_ids"])]]

    metric = EmbeddingFidelity(reference)
    same, details = metric.score(reference, split, batch_size=10)
    assert same == pytest.approx(1.0, abs=1e-6) and details["knn_overlap"] == pytest.approx(1.0)
    noisy = hidden + rng.standard_normal(hidden.shape).astype(np.float32)

    state = {"i": 0}

    def perturbed(feeds):
        start = state["i"]
        state["i"] = (start + len(feeds["input_ids"])) % 30
        return [noisy[start : start + len(feeds["input_ids"])]]

    value, details = metric.score(perturbed, split, batch_size=10)
    assert value < 0.99 and details["cosine_min"] <= details["cosine_mean"] < 1.0


def test_knn_overlap_detects_shuffled_neighbours():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((40, 6))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = a[rng.permutation(40)]
    assert knn_overlap(a, a, 5) == 1.0
    assert knn_overlap(a, b, 5) < 0.5


def test_callable_metric_and_quality_relative():
    split = Split({"x": np.arange(6, dtype=np.float32).reshape(6, 1)}, np.arange(6))
    metric = CallableMetric(lambda outputs, labels: float(outputs[0].sum()), name="sum")
    task = Task("t", metric, {"test": split}, baseline=30.0)
    quality = task.evaluate(lambda feeds: [feeds["x"] * 2])
    assert quality.value == 30.0 and quality.relative == 1.0 and quality.drop == 0.0
    assert Quality("m", 0.9, 1.0).to_dict()["drop"] == pytest.approx(0.1)


def test_unknown_split_is_named():
    task = Task("t", Accuracy(), {"test": Split({"x": np.zeros((1, 1))}, np.zeros(1))})
    with pytest.raises(KeyError, match="no 'train' split"):
        task.split("train")
