"""Label-free quality by output kind: a constant model fails every metric, a faithful one passes."""

from __future__ import annotations

import numpy as np
import pytest

from compactai.models.handle import ModelHandle, TensorSpec
from compactai.tasks import (
    COLLAPSE_RATIO,
    Accuracy,
    ClassifierFidelity,
    EmbeddingFidelity,
    LanguageModelFidelity,
    RegressionFidelity,
    Split,
    Task,
    fidelity_metric,
    output_kind,
)

N, SEQ, VOCAB, CLASSES = 40, 6, 50, 3
rng = np.random.default_rng(0)
IDS = rng.integers(1, VOCAB, (N, SEQ)).astype(np.int64)
MASK = np.ones((N, SEQ), np.int64)
MASK[::3, 4:] = 0  # some padded rows
SPLIT = Split({"input_ids": IDS, "attention_mask": MASK}, rng.integers(0, CLASSES, N))
WEIGHTS = {"logits": rng.standard_normal((VOCAB, CLASSES)), "lm_logits": rng.standard_normal((VOCAB, VOCAB)),
           "embeddings": rng.standard_normal((VOCAB, 8)), "regression": rng.standard_normal((VOCAB, 1))}


def original(kind: str):
    """A deterministic model of token ids: embeddings of each token, pooled for sentence outputs."""

    def predict(feeds):
        per_token = WEIGHTS[kind][feeds["input_ids"]].astype(np.float32)  # (batch, seq, width)
        if kind in ("logits", "regression"):
            mask = feeds["attention_mask"][..., None]
            return [(per_token * mask).sum(1) / mask.sum(1)]
        return [per_token]

    return predict


def constant_like(kind: str):
    """The hardest constant model: the original's mean output, whatever the input."""
    outputs = [original(kind)(feeds)[0] for feeds, _ in SPLIT.batches(N)]
    mean = outputs[0].mean(axis=0, keepdims=True)

    def predict(feeds):
        batch = len(feeds["input_ids"])
        shape = (batch, *mean.shape[1:]) if mean.ndim == 2 else (batch, feeds["input_ids"].shape[1], mean.shape[-1])
        return [np.broadcast_to(mean if mean.ndim == 2 else mean[:, :1], shape).copy()]

    return predict


def noisy(kind: str, scale: float = 0.01):
    noise = np.random.default_rng(1)

    def predict(feeds):
        out = original(kind)(feeds)[0]
        return [out + scale * noise.standard_normal(out.shape).astype(np.float32)]

    return predict


KINDS = ["logits", "lm_logits", "embeddings", "regression"]


@pytest.mark.parametrize("kind", KINDS)
def test_constant_model_fails_every_metric(kind):
    metric = fidelity_metric(original(kind), kind)
    value, details = metric.score(constant_like(kind), SPLIT, 16)
    assert value == 0.0
    assert details["collapsed"] == 1.0 and details["spread_ratio"] < COLLAPSE_RATIO


@pytest.mark.parametrize("kind", KINDS)
def test_faithful_model_passes_and_original_scores_one(kind):
    metric = fidelity_metric(original(kind), kind)
    same, details = metric.score(original(kind), SPLIT, 16)
    assert same == pytest.approx(1.0, abs=1e-6) and details["collapsed"] == 0.0
    close, _ = metric.score(noisy(kind), SPLIT, 16)
    assert close > 0.9


def test_constant_model_fails_accuracy_with_reference_even_on_the_majority_class():
    labels = np.zeros(N, np.int64)  # every label is the class the constant model always picks
    split = Split(SPLIT.inputs, labels)

    def always_zero(feeds):
        return [np.tile(np.array([[5.0, 0.0, 0.0]], np.float32), (len(feeds["input_ids"]), 1))]

    assert Accuracy().score(always_zero, split)[0] == 1.0  # without the reference it looks perfect
    value, details = Accuracy(original("logits")).score(always_zero, split)
    assert value == 0.0 and details["collapsed"] == 1.0


def test_classifier_figures_kl_and_centred_cosine():
    metric = ClassifierFidelity(original("logits"))
    _, same = metric.score(original("logits"), SPLIT, 16)
    assert same["kl_divergence"] == pytest.approx(0.0, abs=1e-9) and same["centred_cosine"] == pytest.approx(1.0)
    _, const = metric.score(constant_like("logits"), SPLIT, 16)
    assert const["kl_divergence"] > 0.01 and abs(const["centred_cosine"]) < 1e-6


def test_language_model_reports_perplexity_ratio():
    metric = LanguageModelFidelity(original("lm_logits"))
    _, same = metric.score(original("lm_logits"), SPLIT, 16)
    assert same["perplexity_ratio"] == pytest.approx(1.0)
    _, const = metric.score(constant_like("lm_logits"), SPLIT, 16)
    assert const["next_token_agreement"] < 0.5 and const["perplexity_ratio"] != pytest.approx(1.0)


def test_regression_relative_error_of_the_mean_is_one():
    _, details = RegressionFidelity(original("regression")).score(constant_like("regression"), SPLIT, 16)
    assert details["relative_error"] == pytest.approx(1.0, rel=1e-3)


def test_embedding_fidelity_flags_collapse():
    value, details = EmbeddingFidelity(original("embeddings")).score(constant_like("embeddings"), SPLIT, 16)
    assert value == 0.0 and details["collapsed"] == 1.0


def _handle(name: str, shape: tuple, metadata: dict | None = None) -> ModelHandle:
    inputs = [TensorSpec("input_ids", ("batch", "sequence"), "int64")]
    return ModelHandle("onnx", "m", inputs, [TensorSpec(name, shape, "float32")], {}, metadata=metadata or {})


@pytest.mark.parametrize(
    "name, shape, metadata, kind",
    [
        ("logits", ("batch", 2), None, "logits"),
        ("logits", ("batch", "sequence", 50257), None, "lm_logits"),
        ("logits", ("batch", "sequence", 9), None, "logits"),
        ("last_hidden_state", ("batch", "sequence", 384), None, "embeddings"),
        ("sentence_embedding", ("batch", 384), None, "embeddings"),
        ("output", ("batch", 1), None, "regression"),
        ("logits", ("batch", "sequence", 300), {"output_kind": "lm_logits"}, "lm_logits"),
    ],
)
def test_output_kind(name, shape, metadata, kind):
    assert output_kind(_handle(name, shape, metadata)) == kind


def test_task_reports_the_metric_of_the_kind():
    task = Task("t", fidelity_metric(original("logits"), "logits"), {"validation": SPLIT}, eval_split="validation")
    quality = task.evaluate(constant_like("logits"))
    assert quality.metric == "top1_agreement" and quality.value == 0.0


def test_unknown_kind_is_named():
    with pytest.raises(KeyError, match="output kind"):
        fidelity_metric(original("logits"), "probabilities")
