"""Tasks: data splits and the quality metric, always reported next to the baseline."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from compactai.errors import BadInputError, ModelNotFoundError, ParameterError, UnknownNameError

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
        if self.baseline is None or self.baseline == 0:  # `is None` so older mypy narrows it too
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
    """Top-1 classification accuracy of output 0 against the split's labels.

    With the original model as ``reference``, a model whose outputs no longer vary with its
    input (see :func:`spread_ratio`) scores 0: a constant model can still hit the majority class.
    """

    name = "accuracy"

    def __init__(self, reference: Predict | None = None) -> None:
        self.reference = reference

    def score(self, predict: Predict, split: Split, batch_size: int = 256) -> tuple[float, dict[str, float]]:
        if split.labels is None:
            raise BadInputError("Accuracy needs labels; this split has none. Pass labels with the data.")
        correct = 0
        pooled, reference_pooled = [], []
        for feeds, labels in split.batches(batch_size):
            output = predict(feeds)[0]
            if output.ndim < 2 or (labels is not None and output.shape[:-1] != labels.shape):
                raise BadInputError(
                    f"Accuracy compares the argmax of output 0 (shape {output.shape}) with labels of shape "
                    f"{None if labels is None else labels.shape}; give one label per output row, or no labels "
                    "to measure fidelity to the original model instead."
                )
            correct += int((output.argmax(axis=-1) == labels).sum())
            if self.reference is not None:
                pooled.append(sample_vectors(output, feeds.get("attention_mask")))
                reference_pooled.append(sample_vectors(self.reference(feeds)[0], feeds.get("attention_mask")))
        accuracy = correct / max(len(split), 1)
        details = {"accuracy": accuracy, "samples": float(len(split))}
        if self.reference is not None:
            accuracy = collapse_guard(accuracy, details, np.concatenate(reference_pooled), np.concatenate(pooled))
        return accuracy, details


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
        return collapse_guard(details[self.primary], details, ref, cand), details


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


# A compressed model whose outputs spread less than this fraction of the original's across a
# split no longer depends on its input (an int8 graph with an infinite activation scale returns
# the same output for every input); working int8/pruned models stay near 1.
COLLAPSE_RATIO = 0.1
OUTPUT_KINDS = ("logits", "lm_logits", "embeddings", "regression")


def sample_vectors(output: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """One float64 vector per sample: 2-D outputs as they are, sequences mean-pooled over the mask."""
    output = np.asarray(output)
    if output.ndim == 1:
        return output[:, None].astype(np.float64)
    if output.ndim == 3:
        return mean_pool(output, mask if mask is not None and mask.shape == output.shape[:2] else None)
    return output.reshape(len(output), -1).astype(np.float64)


def spread(vectors: np.ndarray) -> float:
    """How much outputs vary across samples: the mean over features of the standard deviation."""
    return float(vectors.std(axis=0).mean()) if len(vectors) > 1 else 0.0


def spread_ratio(reference: np.ndarray, candidate: np.ndarray) -> float:
    """The candidate's spread across samples over the reference's (1.0 when the reference is constant)."""
    base = spread(reference)
    return 1.0 if base <= 1e-12 else spread(candidate) / base


def collapse_guard(value: float, details: dict[str, float], reference: np.ndarray, candidate: np.ndarray) -> float:
    """Record the spread ratio in ``details``; return 0 instead of ``value`` for a collapsed model."""
    ratio = spread_ratio(reference, candidate)
    details["spread_ratio"] = ratio
    details["collapsed"] = float(ratio < COLLAPSE_RATIO)
    return 0.0 if ratio < COLLAPSE_RATIO else value


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class _ReferenceFidelity:
    """Shared part of the fidelity metrics: the original model's outputs per split, cached by
    the split's identity (a search scores many candidates on the same split)."""

    name = "fidelity"

    def __init__(self, reference: Predict) -> None:
        self.reference = reference
        self._cache: dict[int, list[np.ndarray]] = {}

    def reference_outputs(self, split: Split, batch_size: int) -> list[np.ndarray]:
        key = id(split)
        if key not in self._cache:
            self._cache[key] = [self.reference(feeds)[0] for feeds, _ in split.batches(batch_size)]
        return self._cache[key]


class ClassifierFidelity(_ReferenceFidelity):
    """Agreement of a classifier's logits with the original's: top-1 agreement (the headline),
    KL divergence of the softmax to the original's, and the cosine of logits centred over the
    split (shift-free and 0 for a constant model). Per-token logits count valid tokens."""

    name = "top1_agreement"

    def score(self, predict: Predict, split: Split, batch_size: int = 64) -> tuple[float, dict[str, float]]:
        refs, cands, ref_pooled, cand_pooled = [], [], [], []
        for (feeds, _), ref in zip(split.batches(batch_size), self.reference_outputs(split, batch_size)):
            cand = predict(feeds)[0]
            mask = feeds.get("attention_mask")
            ref_pooled.append(sample_vectors(ref, mask))
            cand_pooled.append(sample_vectors(cand, mask))
            if ref.ndim == 3:  # token classification: valid tokens are the samples
                keep = mask.astype(bool) if mask is not None else np.ones(ref.shape[:2], bool)
                ref, cand = ref[keep], cand[keep]
            refs.append(ref.reshape(-1, ref.shape[-1]))
            cands.append(cand.reshape(-1, cand.shape[-1]))
        ref_logits, cand_logits = np.concatenate(refs), np.concatenate(cands)
        agreement = float((ref_logits.argmax(-1) == cand_logits.argmax(-1)).mean())
        ref_log, cand_log = log_softmax(ref_logits), log_softmax(cand_logits)
        kl = float((np.exp(ref_log) * (ref_log - cand_log)).sum(axis=-1).mean())
        centred_ref = ref_logits - ref_logits.mean(axis=0, dtype=np.float64)
        centred_cand = cand_logits - cand_logits.mean(axis=0, dtype=np.float64)
        norms = np.linalg.norm(centred_ref, axis=1) * np.linalg.norm(centred_cand, axis=1)
        # rounding noise of a constant model is no direction: norms below 1e-6 of typical count as 0
        floor = 1e-12 + 1e-6 * float(np.linalg.norm(centred_ref, axis=1).mean()) ** 2
        cosine = np.where(norms > floor, (centred_ref * centred_cand).sum(axis=1) / np.maximum(norms, floor), 0.0)
        details = {"top1_agreement": agreement, "kl_divergence": kl, "centred_cosine": float(cosine.mean()),
                   "samples": float(len(ref_logits))}
        return collapse_guard(agreement, details, np.concatenate(ref_pooled), np.concatenate(cand_pooled)), details


class LanguageModelFidelity(_ReferenceFidelity):
    """A causal LM against the original: next-token top-1 agreement over real (unmasked)
    positions (the headline) and the perplexity ratio on the split's own text (candidate's
    perplexity over the original's; 1.0 is unchanged, higher is worse)."""

    name = "next_token_agreement"

    def score(self, predict: Predict, split: Split, batch_size: int = 64) -> tuple[float, dict[str, float]]:
        agree = positions = 0
        nll = {"reference": 0.0, "candidate": 0.0}
        targets = 0
        ref_pooled, cand_pooled = [], []
        for (feeds, _), ref in zip(split.batches(batch_size), self.reference_outputs(split, batch_size)):
            cand = predict(feeds)[0]
            mask = feeds.get("attention_mask")
            valid = mask.astype(bool) if mask is not None else np.ones(ref.shape[:2], bool)
            agree += int((ref.argmax(-1) == cand.argmax(-1))[valid].sum())
            positions += int(valid.sum())
            ref_pooled.append(sample_vectors(ref, mask))
            cand_pooled.append(sample_vectors(cand, mask))
            ids = feeds.get("input_ids")
            if ids is not None and ids.shape[1] > 1:
                pairs = valid[:, :-1] & valid[:, 1:]  # position t predicts token t+1
                for key, logits in (("reference", ref), ("candidate", cand)):
                    picked = np.take_along_axis(log_softmax(logits[:, :-1]), ids[:, 1:, None], axis=-1)[..., 0]
                    nll[key] -= float(picked[pairs].sum())
                targets += int(pairs.sum())
        agreement = agree / max(positions, 1)
        details = {"next_token_agreement": agreement, "positions": float(positions)}
        if targets:
            details["perplexity"] = float(np.exp(nll["candidate"] / targets))
            details["reference_perplexity"] = float(np.exp(nll["reference"] / targets))
            details["perplexity_ratio"] = details["perplexity"] / details["reference_perplexity"]
        return collapse_guard(agreement, details, np.concatenate(ref_pooled), np.concatenate(cand_pooled)), details


class RegressionFidelity(_ReferenceFidelity):
    """A regression model against the original: relative error (RMSE over the original outputs'
    standard deviation, so 1.0 is what predicting the mean scores); the headline is
    ``1 - relative_error`` (floored at 0), higher is better."""

    name = "regression_fidelity"

    def score(self, predict: Predict, split: Split, batch_size: int = 64) -> tuple[float, dict[str, float]]:
        refs, cands = [], []
        for (feeds, _), ref in zip(split.batches(batch_size), self.reference_outputs(split, batch_size)):
            refs.append(sample_vectors(ref, feeds.get("attention_mask")))
            cands.append(sample_vectors(predict(feeds)[0], feeds.get("attention_mask")))
        ref_values, cand_values = np.concatenate(refs), np.concatenate(cands)
        rmse = float(np.sqrt(((ref_values - cand_values) ** 2).mean()))
        scale = float(ref_values.std()) or float(np.abs(ref_values).mean()) or 1.0
        relative = rmse / scale
        details = {"relative_error": relative, "rmse": rmse}
        return collapse_guard(max(0.0, 1.0 - relative), details, ref_values, cand_values), details


def output_kind(handle: Any) -> str:
    """What output 0 of a model is (one of OUTPUT_KINDS): what its loader recorded, else read
    from its name and shape: ``(batch, seq, vocab)`` logits of a token-id model with a vocabulary
    (>= 1000 columns) are LM logits, other sequences are embeddings, one column is regression."""
    recorded = handle.metadata.get("output_kind")
    if recorded in OUTPUT_KINDS:
        return str(recorded)
    spec = handle.outputs[0]
    name, shape = spec.name.lower(), spec.shape
    if len(shape) <= 1 or (len(shape) == 2 and shape[-1] == 1):
        return "regression"
    if len(shape) == 3:
        vocabulary = isinstance(shape[-1], int) and shape[-1] >= 1000
        return "lm_logits" if "logit" in name and vocabulary and "input_ids" in handle.input_names else (
            "logits" if "logit" in name else "embeddings")
    return "embeddings" if any(w in name for w in ("embed", "hidden", "pool", "sentence")) else "logits"


def fidelity_metric(reference: Predict, kind: str) -> Metric:
    """The label-free quality metric for an output kind, judged against the original model."""
    metrics: dict[str, Callable[[Predict], Metric]] = {
        "logits": ClassifierFidelity,
        "lm_logits": LanguageModelFidelity,
        "embeddings": EmbeddingFidelity,
        "regression": RegressionFidelity,
    }
    if kind not in metrics:
        raise UnknownNameError(f"Unknown output kind '{kind}'; choose one of: {', '.join(OUTPUT_KINDS)}.")
    return metrics[kind](reference)


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
    def from_npz(cls, path: str | Path, inputs: Sequence[Any], reference: Predict, *, name: str | None = None,
                 kind: str = "embeddings") -> Task:
        """A Task from an .npz of '<split>/<input>' arrays and optional '<split>/labels' (read without
        pickle). ``inputs`` are the model's input specs (``handle.inputs``, or just names) and
        ``reference`` is the original model's predict function: with labels in the test split the
        metric is accuracy (with the collapse check against ``reference``), without it is the fidelity
        of output 0 to ``reference`` for its ``kind`` (``compactai.tasks.output_kind(handle)``:
        classifier or LM logits, embeddings, regression). The baseline is
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
        has_labels = splits["test"].labels is not None
        metric: Metric = Accuracy(reference) if has_labels else fidelity_metric(reference, kind)
        task = cls(name=name or path.stem, metric=metric, splits=splits)
        task.baseline = task.evaluate(reference).value
        return task

    def scored_by(self, figure: str) -> Task:
        """This task with ``figure`` as its headline quality (what budgets and floors read): for an
        embedding task cosine_min (default), cosine_mean or knn_overlap; other metrics have one figure."""
        if not isinstance(self.metric, EmbeddingFidelity):
            if figure == self.metric.name:
                return self
            raise ParameterError(f"--quality-figure {figure}: the task's metric {self.metric.name} has only one "
                                 "figure; cosine_min, cosine_mean and knn_overlap are for embedding tasks.")
        metric = EmbeddingFidelity(self.metric.reference, primary=figure, neighbours=self.metric.neighbours)
        return Task(self.name, metric, self.splits, self.eval_split, self.baseline, self.batch_size)

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
