"""Built-in examples: real models and data that need no downloads.

``load_example(name)`` returns an :class:`Example` (a model handle and its task).
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compactai._registry import Registry
from compactai.models.handle import ModelHandle
from compactai.tasks import Task


@dataclass
class Example:
    """A built-in model with its task; ``info`` holds plain facts about the data."""

    name: str
    handle: ModelHandle
    task: Task
    description: str
    info: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    """Where trained examples are cached: $COMPACTAI_CACHE_DIR or the user cache dir."""
    env = os.environ.get("COMPACTAI_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("compactai"))


def _digits(progress: Any = None) -> Example:
    import torch

    from compactai.examples import digits
    from compactai.models.load import load_model

    splits = digits.load_digits_splits()
    teacher = digits.load_or_train_teacher(cache_dir(), splits, progress=progress)
    handle = load_model(
        teacher,
        {"image": torch.from_numpy(splits["test"].inputs["image"][:1])},
        name="digits-resnet",
        kind="cnn",
        output_names=["logits"],
    )
    task = digits.digits_task(splits)
    task.baseline = task.evaluate(handle.run_torch).value
    return Example(
        "digits",
        handle,
        task,
        "Residual CNN (~1.1M params) on scikit-learn's handwritten digits, upsampled to 32x32.",
        {"splits": {k: len(v) for k, v in splits.items()}, "recipe": digits.RECIPE},
    )


def _minilm(progress: Any = None) -> Example:
    from compactai.examples import minilm
    from compactai.models.load import load_hf_directory
    from compactai.tasks import EmbeddingFidelity, trim_padding

    directory = minilm.model_directory()
    handle = load_hf_directory(directory, name="all-MiniLM-L6-v2")
    tokenizer = minilm.load_tokenizer(directory)
    splits, texts = minilm.corpus_splits(tokenizer)
    # the latency probe is one real test sentence of median token length, padding trimmed
    lengths = splits["test"].inputs["attention_mask"].sum(axis=1)
    median = int(np.argsort(lengths)[len(lengths) // 2])
    handle.example_inputs = trim_padding(splits["test"].take(np.array([median])).inputs)
    reference = handle.run_torch
    task = Task(
        name="minilm",
        metric=EmbeddingFidelity(reference),
        splits=splits,
        eval_split="test",
        baseline=1.0,
        batch_size=64,
    )
    return Example(
        "minilm",
        handle,
        task,
        "all-MiniLM-L6-v2 sentence encoder (packaged offline) on sentences from installed package metadata.",
        {
            "splits": {k: len(v) for k, v in splits.items()},
            "corpus_sha256": minilm.corpus_fingerprint(functools.reduce(operator.iadd, texts.values(), [])),
            "tokenizer_dir": str(directory),
            "texts": texts,
        },
    )


EXAMPLES: Registry[Callable[..., Example]] = Registry("example")
EXAMPLES.register("digits", _digits)
EXAMPLES.register("minilm", _minilm)


def load_example(name: str, progress: Any = None) -> Example:
    """The built-in example ``name`` (see EXAMPLES)."""
    return EXAMPLES.get(name)(progress=progress)


__all__ = ["EXAMPLES", "Example", "cache_dir", "load_example"]
