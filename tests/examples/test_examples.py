from __future__ import annotations

import functools
import operator

import numpy as np
import pytest

from compactai.errors import UnknownNameError


def test_digits_teacher_is_large_and_accurate(digits):
    assert digits.handle.kind == "cnn"
    params = sum(p.numel() for p in digits.handle.module.parameters())
    assert params >= 1_000_000
    assert digits.task.baseline >= 0.97
    assert digits.task.evaluate(digits.handle.run_torch).value == pytest.approx(digits.task.baseline)


def test_digits_splits_are_fixed_and_disjoint():
    from compactai.examples.digits import load_digits_splits

    a, b = load_digits_splits(), load_digits_splits()
    np.testing.assert_array_equal(a["test"].labels, b["test"].labels)
    train = {x.tobytes() for x in a["train"].inputs["image"]}
    overlap = sum(x.tobytes() in train for x in a["test"].inputs["image"])
    assert overlap <= 2  # sklearn's digits holds a few exact duplicate images
    assert a["calibration"].inputs["image"].shape[1:] == (1, 32, 32)


def test_minilm_corpus_is_clean_deduplicated_and_split(minilm):
    texts = minilm.info["texts"]
    assert len(texts["test"]) >= 400 and len(texts["train"]) >= 2000
    assert not set(texts["test"]) & set(texts["train"])
    everything = functools.reduce(operator.iadd, texts.values(), [])
    assert not any("://" in s or "```" in s for s in everything)
    normalized = [s.lower() for s in texts["train"] + texts["test"] + texts["validation"]]
    assert len(normalized) == len(set(normalized))
    assert minilm.task.metric.name == "embedding_fidelity"


def test_clean_sentences_drops_code_and_links():
    from compactai.examples.minilm import clean_sentences

    text = "Intro paragraph that explains the [library](https://x.y) to new users clearly.\n\n" \
           "```python\nimport x  # This is code that should not appear.\n```\n\n" \
           "    indented = code_block()  # Also not prose at all here.\n\n" \
           "- A bullet item that is a complete and useful sentence.\n"
    sentences = clean_sentences(text)
    assert sentences == [
        "Intro paragraph that explains the library to new users clearly.",
        "A bullet item that is a complete and useful sentence.",
    ]


def test_unknown_example_lists_known():
    from compactai import load_example

    with pytest.raises(UnknownNameError, match="digits, minilm"):
        load_example("mnist")
