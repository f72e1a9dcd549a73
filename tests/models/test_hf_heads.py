"""Hugging Face directories load by their declared architecture: heads kept, logits out, and the
handle says what was loaded. Models are tiny, seeded and built here (tests/zoo/hf.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from compactai import load_model
from compactai.errors import UnknownNameError, UnsupportedFormatError
from tests.zoo.hf import bert_classifier_dir, gpt2_dir


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return bert_classifier_dir(tmp_path_factory.mktemp("hf") / "bert-classifier", labels=3)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return gpt2_dir(tmp_path_factory.mktemp("hf") / "gpt2")


def test_sequence_classifier_keeps_its_head(bert_dir):
    from transformers import BertForSequenceClassification

    handle = load_model(bert_dir)
    assert handle.output_names == ["logits"] and handle.outputs[0].shape == ("batch", 3)
    meta = handle.metadata
    assert meta["architecture"] == "BertForSequenceClassification" and meta["hf_task"] == "sequence-classification"
    assert meta["output_kind"] == "logits" and meta["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
    reference = BertForSequenceClassification.from_pretrained(str(bert_dir), use_safetensors=True).eval()
    feeds = handle.example_inputs
    with torch.inference_mode():
        expected = reference(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    np.testing.assert_allclose(handle.run_torch(feeds)[0], expected, atol=1e-5)


def test_hf_task_overrides_the_architecture(bert_dir):
    handle = load_model(bert_dir, hf_task="embedding")
    assert handle.output_names == ["last_hidden_state"] and handle.metadata["output_kind"] == "embeddings"
    assert handle.metadata["architecture"] == "BertForSequenceClassification"  # declared, not what was loaded
    with pytest.raises(UnknownNameError, match="causal-lm"):
        load_model(bert_dir, hf_task="question-answering")


def test_gpt2_loads_with_its_lm_head_without_a_pad_token(gpt2):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(gpt2)).pad_token is None  # as GPT-2 ships
    handle = load_model(gpt2)
    vocab = json.loads((gpt2 / "config.json").read_text())["vocab_size"]
    assert handle.metadata["hf_task"] == "causal-lm" and handle.metadata["output_kind"] == "lm_logits"
    assert handle.outputs[0].shape == ("batch", "sequence", vocab)
    logits = handle.run_torch(handle.example_inputs)[0]
    assert logits.shape == (*handle.example_inputs["input_ids"].shape, vocab)
    # a batch padded with eos (masked out) gives the unpadded logits on the real tokens
    ids = handle.example_inputs["input_ids"]
    eos = json.loads((gpt2 / "config.json").read_text())["eos_token_id"]
    padded = {"input_ids": np.concatenate([ids, [[eos] * 3]], axis=1),
              "attention_mask": np.concatenate([np.ones_like(ids), np.zeros((1, 3), np.int64)], axis=1)}
    np.testing.assert_allclose(handle.run_torch(padded)[0][:, : ids.shape[1]], logits, atol=1e-4)


def test_gpt2_exports_with_parity(gpt2, tmp_path):
    handle = load_model(gpt2)
    onnx_handle = handle.to_onnx(tmp_path / "gpt2.onnx")
    assert onnx_handle.metadata["output_kind"] == "lm_logits"
    assert onnx_handle.outputs[0].name == "logits"


def test_unsupported_head_is_refused_not_loaded_as_an_encoder(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(str(tmp_path), safe_serialization=True)
    with pytest.raises(UnsupportedFormatError, match=r"BertForMaskedLM.*--hf-task"):
        load_model(tmp_path)


def test_packaged_minilm_still_loads_as_a_sentence_encoder():
    from compactai.examples.minilm import model_directory

    handle = load_model(model_directory())
    assert handle.output_names == ["last_hidden_state"] and handle.metadata["hf_task"] == "embedding"
    assert handle.example_inputs["input_ids"].shape[0] == 2  # the two text probes, padded, as before


@pytest.mark.slow
def test_profile_with_data_reports_quality_and_what_was_loaded(bert_dir, tmp_path):
    import subprocess
    import sys

    from tests.zoo.hf import token_npz

    data = token_npz(tmp_path / "data.npz", bert_dir, labels=3)
    result = subprocess.run(
        [sys.executable, "-c", "from compactai.cli import main; main()", "profile", str(bert_dir), "--data", str(data),
         "--json", "--runtime", "onnxruntime", "--queries", "20", "--seconds", "0.1", "--no-memory"],
        capture_output=True, text=True, timeout=900, check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    profile = json.loads(result.stdout)
    assert profile["model"]["architecture"] == "BertForSequenceClassification"
    assert profile["model"]["output_kind"] == "logits" and profile["model"]["outputs"][0]["name"] == "logits"
    quality = profile["measurements"]["onnxruntime"]["quality"]
    assert quality["metric"] == "accuracy" and quality["value"] == quality["baseline"]
    assert profile["task"]["splits"] == {"calibration": 32, "validation": 64, "test": 64}
