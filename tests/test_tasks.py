from __future__ import annotations

import numpy as np
import pytest

from compactai.errors import BadInputError
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


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_task_from_npz_reads_splits_and_measures_the_baseline(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "calibration", "validation", "test"):
        arrays[f"{split}/x"] = rng.standard_normal((10, 2)).astype(np.float32)
        arrays[f"{split}/labels"] = (arrays[f"{split}/x"][:, 0] > 0).astype(np.int64)
    path = _npz(tmp_path / "data.npz", **arrays)

    def reference(feeds):  # the "model": class 1 when x[0] > 0, i.e. always right
        return [np.stack([-feeds["x"][:, 0], feeds["x"][:, 0]], axis=1)]

    task = Task.from_npz(path, ["x"], reference)
    assert set(task.splits) == {"train", "calibration", "validation", "test"} and task.metric.name == "accuracy"
    assert task.baseline == 1.0 and task.name == "data"
    unlabelled = {k: v for k, v in arrays.items() if not k.endswith("labels")}
    fidelity = Task.from_npz(_npz(tmp_path / "nolabels.npz", **unlabelled), ["x"], reference)
    assert fidelity.metric.name == "embedding_fidelity" and fidelity.baseline == pytest.approx(1.0)


@pytest.mark.parametrize("change, message", [
    ({"test/x": np.full((10, 2), np.nan, np.float32)}, "NaN or infinite"),
    ({"test/x": np.zeros((0, 2), np.float32), "test/labels": np.zeros(0, np.int64)}, "no rows"),
    ({"test/labels": np.zeros(3, np.int64)}, "3 labels for 10 rows"),
    ({"test/labels": np.zeros(10, np.float32)}, "integer class indices"),
    ({"test/" + "y" * 2000: np.zeros(1)}, "too long or too deeply nested"),
    ({"test/x": np.array(["a"] * 10)}, "store numbers"),
])
def test_task_from_npz_refuses_bad_data_in_one_line(tmp_path, change, message):
    arrays = {f"{s}/x": np.ones((10, 2), np.float32) for s in ("calibration", "validation", "test")}
    arrays.update({f"{s}/labels": np.zeros(10, np.int64) for s in ("calibration", "validation", "test")})
    arrays.update(change)
    with pytest.raises(BadInputError, match=message):
        Task.from_npz(_npz(tmp_path / "bad.npz", **arrays), ["x"], lambda feeds: [feeds["x"]])
