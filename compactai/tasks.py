"""Tasks: data splits and the quality metric, always reported next to the baseline."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from compactai.errors import BadInputError, UnknownNameError

SPLITS = ("train", "calibration", "validation", "test")
Predict = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


@dataclass
class Split:
    """Model inputs by name (first axis = samples) and optional labels.

    When an ``attention_mask`` input is present, batches are trimmed to their longest
    sequence, so padding added for storage costs nothing at run time.
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, indices: np.ndarray | slice | int) -> Split:
        """The samples at ``indices`` (an int means the first n)."""
        if isinstance(indices, int):
            indices = slice(0, indices)
        labels = self.labels[indices] if self.labels is not None else None
        return Split({k: v[indices] for k, v in self.inputs.items()}, labels)

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """(feeds, labels) batches in order."""
        for start in range(0, len(self), batch_size):
            part = self.take(slice(start, start + batch_size))
            yield trim_padding(part.inputs), part.labels


def trim_padding(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cut columns that are padding in every row (needs an ``attention_mask`` input)."""
    mask = feeds.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return feeds
    length = int(mask.sum(axis=1).max()) if len(mask) else 0
    length = max(length, 1)
    return {k: (v[:, :length] if v.ndim == 2 and v.shape[1] == mask.shape[1] else v) for k, v in feeds.items()}


@dataclass
class Quality:
    """One quality figure with its baseline: absolute, relative and drop."""

    metric: str
    value: float
    baseline: float | None = None
    details: dict[str, float] = field(default_factory=dict)

    @property
    def relative(self) -> float | None:
        if self.baseline in (None, 0):
            return None
        return self.value / self.baseline

    @property
    def drop(self) -> float | None:
        return None if self.baseline is None else self.baseline - self.value

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "value": self.value,
            "baseline": self.baseline,
            "relative": self.relative,
            "drop": self.drop,
            "details": self.details,
        }


class Metric(Protocol):
    """Scores a model (given as a predict function) on a split. Higher is better."""

    name: str

    def score(self, predict: Predict, split: Split, batch_size: int) -> tuple[float, dict[str, float]]: ...


class Accuracy:
    """Top-1 classification accuracy of output 0 against the split's labels."""

    name = "accuracy"

    def score(self, predict: Predict, split: Split, batch_size: int = 256) -> tuple[float, dict[str, float]]:
        if split.labels is None:
            raise BadInputError("Accuracy needs labels; this split has none. Pass labels with the data.")
        correct = 0
        for feeds, labels in split.batches(batch_size):
            correct += int((predict(feeds)[0].argmax(axis=-1) == labels).sum())
        accuracy = correct / max(len(split), 1)
        return accuracy, {"accuracy": accuracy, "samples": float(len(split))}


def mean_pool(hidden: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Mean of token vectors over the attention mask (sentence-transformers pooling)."""
    if hidden.ndim == 2:
        return hidden.astype(np.float64)
    if mask is None:
        return hidden.mean(axis=1, dtype=np.float64)
    weights = mask[..., None].astype(np.float64)
    return (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)


def normalize(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


class EmbeddingFidelity:
    """How closely a model's sentence embeddings match a reference model's.

    Embeddings are mean-pooled over the attention mask. Reports cosine mean and minimum
    and the overlap of 10-nearest-neighbour sets; ``primary`` picks the headline figure
    (default: the minimum cosine, the strictest one).
    """

    name = "embedding_fidelity"

    def __init__(self, reference: Predict, primary: str = "cosine_min", neighbours: int = 10) -> None:
        if primary not in ("cosine_min", "cosine_mean", "knn_overlap"):
            raise UnknownNameError(
                f"Unknown primary figure '{primary}'; choose cosine_min, cosine_mean or knn_overlap."
            )
        self.reference = reference
        self.primary = primary
        self.neighbours = neighbours
        self._cache: dict[int, np.ndarray] = {}

    def embed(self, predict: Predict, split: Split, batch_size: int) -> np.ndarray:
        rows = []
        for feeds, _ in split.batches(batch_size):
            rows.append(mean_pool(predict(feeds)[0], feeds.get("attention_mask")))
        return normalize(np.concatenate(rows))

    def reference_embeddings(self, split: Split, batch_size: int) -> np.ndarray:
        key = id(split)
        if key not in self._cache:
            self._cache[key] = self.embed(self.reference, split, batch_size)
        return self._cache[key]

    def score(self, predict: Predict, split: Split, batch_size: int = 64) -> tuple[float, dict[str, float]]:
        ref = self.reference_embeddings(split, batch_size)
        cand = self.embed(predict, split, batch_size)
        cosines = (ref * cand).sum(axis=1)
        details = {
            "cosine_mean": float(cosines.mean()),
            "cosine_min": float(cosines.min()),
            "knn_overlap": knn_overlap(ref, cand, self.neighbours),
        }
        return details[self.primary], details


def knn_overlap(reference: np.ndarray, candidate: np.ndarray, k: int) -> float:
    """Mean fraction of each item's k nearest neighbours (cosine) shared by both embeddings."""
    k = min(k, len(reference) - 1)
    if k <= 0:
        return 1.0

    def neighbours(vectors: np.ndarray) -> np.ndarray:
        sims = vectors @ vectors.T
        np.fill_diagonal(sims, -np.inf)
        return np.argsort(-sims, axis=1)[:, :k]

    ref_nn, cand_nn = neighbours(reference), neighbours(candidate)
    shared = [len(set(a) & set(b)) / k for a, b in zip(ref_nn, cand_nn)]
    return float(np.mean(shared))


class CallableMetric:
    """A user-supplied metric: ``fn(outputs, labels) -> float`` over the whole split."""

    def __init__(self, fn: Callable[[list[np.ndarray], np.ndarray | None], float], name: str = "custom") -> None:
        self.fn = fn
        self.name = name

    def score(self, predict: Predict, split: Split, batch_size: int = 256) -> tuple[float, dict[str, float]]:
        outputs: list[list[np.ndarray]] = []
        for feeds, _ in split.batches(batch_size):
            outputs.append(predict(feeds))
        merged = [np.concatenate([o[i] for o in outputs]) for i in range(len(outputs[0]))] if outputs else []
        value = float(self.fn(merged, split.labels))
        return value, {self.name: value}


@dataclass
class Task:
    """The data splits a model is tuned and judged on, and the quality metric.

    ``baseline`` is the uncompressed model's quality on ``eval_split``; every
    evaluation is reported next to it.
    """

    name: str
    metric: Metric
    splits: dict[str, Split]
    eval_split: str = "test"
    baseline: float | None = None
    batch_size: int = 64

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise UnknownNameError(
                f"Task '{self.name}' has no '{name}' split; it has {', '.join(self.splits) or 'none'}."
            )
        return self.splits[name]

    def evaluate(self, runner: Any, split: str | None = None) -> Quality:
        """Quality of a runner (anything with ``run(feeds)``) or predict function on a split."""
        predict = runner.run if hasattr(runner, "run") else runner
        value, details = self.metric.score(predict, self.split(split or self.eval_split), self.batch_size)
        return Quality(self.metric.name, value, self.baseline, details)
