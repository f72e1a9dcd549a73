"""Tasks: data splits and the quality metric, always reported next to the baseline."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from compactai.errors import BadInputError, ModelNotFoundError, UnknownNameError

SPLITS = ("train", "calibration", "validation", "test")
Predict = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
# Bounds on task .npz files, checked on the zip directory before any array is read: a hostile or
# broken file is refused in one line instead of ending in ENAMETOOLONG, RecursionError or MemoryError.
NPZ_MAX_MEMBERS = 10_000
NPZ_MAX_NAME_CHARS = 1_024
NPZ_MAX_NAME_LEVELS = 16  # '/'-separated parts of a member name ('test/input_ids' has 2)
NPZ_MAX_BYTES = 8 * 2**30  # uncompressed bytes of the arrays a task reads


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

    @classmethod
    def from_npz(cls, path: str | Path, inputs: Sequence[Any], reference: Predict, *, name: str | None = None) -> Task:
        """A Task from an .npz of '<split>/<input>' arrays and optional '<split>/labels' (read without
        pickle). ``inputs`` are the model's input specs (``handle.inputs``, or just names) and
        ``reference`` is the original model's predict function: with labels in the test split the
        metric is accuracy, without it is the fidelity of output 0 to ``reference``. The baseline is
        ``reference``'s quality on the test split. Splits calibration, validation and test are
        required; every array is checked (rows, label counts, finite values) before use."""
        path = Path(path)
        names = [getattr(spec, "name", spec) for spec in inputs]
        wanted = {f"{split}/{n}" for split in SPLITS for n in [*names, "labels"]}
        arrays = _read_npz(path, wanted)
        splits = {}
        for split in SPLITS:
            found = {n: arrays[f"{split}/{n}"] for n in names if f"{split}/{n}" in arrays}
            if len(found) == len(names):
                splits[split] = _checked_split(path, split, found, arrays.get(f"{split}/labels"))
        missing = [s for s in ("calibration", "validation", "test") if s not in splits]
        if missing:
            raise BadInputError(
                f"{path} lacks the {', '.join(missing)} split(s); store arrays named "
                f"'<split>/<input>' for inputs {names}."
            )
        metric: Metric = Accuracy() if splits["test"].labels is not None else EmbeddingFidelity(reference)
        task = cls(name=name or path.stem, metric=metric, splits=splits)
        task.baseline = task.evaluate(reference).value
        return task

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


def _read_npz(path: Path, wanted: set[str]) -> dict[str, np.ndarray]:
    """The ``wanted`` arrays of an .npz, after checking its member count, names and sizes."""
    try:
        exists = path.is_file()
    except OSError as exc:  # e.g. ENAMETOOLONG
        raise BadInputError(f"Cannot use the data path {str(path)[:200]}...: {exc.strerror}.") from None
    if not exists:
        raise ModelNotFoundError(f"Data file {path} does not exist; give an .npz of '<split>/<input>' arrays.")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadInputError(f"Cannot read {path} as a numpy .npz ({exc}); save the data with numpy.savez.") from None
    if len(infos) > NPZ_MAX_MEMBERS:
        raise BadInputError(f"{path} holds {len(infos)} arrays, more than {NPZ_MAX_MEMBERS}; keep only "
                            "'<split>/<input>' and '<split>/labels' arrays.")
    total = 0
    for info in infos:
        member = info.filename.removesuffix(".npy")
        if len(member) > NPZ_MAX_NAME_CHARS or member.count("/") >= NPZ_MAX_NAME_LEVELS:
            raise BadInputError(
                f"{path} has an array whose name is too long or too deeply nested ('{member[:60]}...', "
                f"{len(member)} characters); name arrays '<split>/<input>' (at most {NPZ_MAX_NAME_CHARS} "
                f"characters, {NPZ_MAX_NAME_LEVELS} levels)."
            )
        total += info.file_size if member in wanted else 0
    if total > NPZ_MAX_BYTES:
        raise BadInputError(f"{path} holds {total / 2**30:.1f} GiB of task arrays, more than "
                            f"{NPZ_MAX_BYTES / 2**30:.0f} GiB; use fewer rows (a few thousand per split is enough).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files if key in wanted}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:  # object arrays need pickle: refused
        raise BadInputError(f"Cannot read {path} as a numpy .npz without pickle: {str(exc)[:200]}") from None


def _checked_split(path: Path, split: str, inputs: dict[str, np.ndarray], labels: np.ndarray | None) -> Split:
    """A Split whose arrays have the same number of rows (at least one), finite numbers, and one
    integer label per row."""
    where = f"{path}, split '{split}'"
    rows = {n: (len(a) if a.ndim else None) for n, a in inputs.items()}
    if any(r is None for r in rows.values()):
        raise BadInputError(f"{where}: inputs must be arrays with one row per sample; got a scalar.")
    if len(set(rows.values())) > 1:
        raise BadInputError(f"{where}: inputs have different numbers of rows {rows}; give each the same rows.")
    count = next(iter(rows.values()))
    if count == 0:
        raise BadInputError(f"{where} has no rows; give at least one sample per split.")
    for n, array in inputs.items():
        if array.dtype.kind not in "biuf":
            raise BadInputError(f"{where}: input '{n}' holds {array.dtype} values; store numbers.")
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            bad = int((~np.isfinite(array)).sum())
            raise BadInputError(f"{where}: input '{n}' holds {bad} NaN or infinite value(s); clean or drop those rows.")
    if labels is not None:
        if labels.dtype.kind not in "biu" or labels.ndim != 1:
            raise BadInputError(f"{where}: labels must be a 1-D array of integer class indices; got "
                                f"{labels.dtype} with shape {labels.shape}.")
        if len(labels) != count:
            raise BadInputError(f"{where} has {len(labels)} labels for {count} rows; give one label per row.")
    return Split(inputs, labels)
