"""Hugging Face directories, loaded by their declared architecture so the user's head is kept.

``config.architectures`` names the class that was trained (``BertForSequenceClassification``,
``GPT2LMHeadModel``, ``BertModel``, ...). The loader builds that class, wraps it so its forward
takes ``(input_ids, attention_mask)`` and returns one named output, and records what it loaded
(architecture, task, output and its kind) in the handle's metadata, so profiles and quality
metrics use the same figures the model produces. An architecture whose head is not supported
is refused, not loaded as something else; ``hf_task`` overrides the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compactai.errors import CorruptModelError, UnknownNameError, UnsupportedFormatError

# task -> (transformers Auto class, output attribute, output kind for the quality metric)
HF_TASKS: dict[str, tuple[str, str, str]] = {
    "embedding": ("AutoModel", "last_hidden_state", "embeddings"),
    "sequence-classification": ("AutoModelForSequenceClassification", "logits", "logits"),
    "token-classification": ("AutoModelForTokenClassification", "logits", "logits"),
    "causal-lm": ("AutoModelForCausalLM", "logits", "lm_logits"),
}
# class-name endings of config.architectures -> task
_ARCHITECTURE_SUFFIXES = (
    ("ForSequenceClassification", "sequence-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
)
TEXT_PROBES = ["compactai scales models down.", "A small sentence for tracing the encoder input shapes."]


def task_for_architecture(architecture: str | None) -> str:
    """The loader task for a ``config.architectures`` entry; bare encoders (``BertModel``) and
    directories that declare none load as sentence encoders, as sentence-transformers ships them."""
    if not architecture:
        return "embedding"
    for suffix, task in _ARCHITECTURE_SUFFIXES:
        if architecture.endswith(suffix):
            return task
    if architecture.endswith("Model"):
        return "embedding"
    raise UnsupportedFormatError(
        f"The Hugging Face directory declares architecture {architecture}, whose head compactai does not "
        f"load yet; pass --hf-task (hf_task=) one of {', '.join(HF_TASKS)} to load it as that, knowing "
        "that a different head is not the model you trained."
    )


class HFOutput:
    """Wraps a Hugging Face model so its forward takes (input_ids, attention_mask) and returns
    one output (``last_hidden_state`` of an encoder, ``logits`` of a classifier or LM)."""

    def __new__(cls, model: Any, output: str = "last_hidden_state") -> Any:
        import torch

        class _Wrapped(torch.nn.Module):
            def __init__(self, inner: Any) -> None:
                super().__init__()
                self.encoder = inner  # attribute name kept from the encoder-only loader (state_dict keys)

            def forward(self, input_ids: Any, attention_mask: Any) -> Any:
                kwargs = {"use_cache": False} if output == "logits" and hasattr(self.encoder, "generate") else {}
                result = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
                return getattr(result, output)

        return _Wrapped(model)


def SentenceEncoder(model: Any) -> Any:  # a class-like name: callers and tests build it like the class it was
    """An encoder returning its last hidden state (token embeddings; pooling happens in the task)."""
    return HFOutput(model, "last_hidden_state")


@dataclass
class LoadedHF:
    """What :func:`build_hf_model` made: the wrapped module, probe inputs and what was loaded."""

    module: Any
    feeds: dict[str, np.ndarray]
    output_name: str
    metadata: dict[str, Any]


def build_hf_model(path: Path, hf_task: str | None = None) -> LoadedHF:
    """Build the declared (or ``hf_task``) model of a Hugging Face directory, offline, from
    safetensors only; returns the wrapped module, probe inputs and metadata."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise CorruptModelError(
            f"Cannot read the Hugging Face config in {path} offline: {str(exc).splitlines()[0][:200]}"
        ) from exc
    architectures = list(getattr(config, "architectures", None) or [])
    architecture = architectures[0] if architectures else None
    if hf_task is not None and hf_task not in HF_TASKS:
        raise UnknownNameError(f"Unknown Hugging Face task '{hf_task}'; choose one of: {', '.join(HF_TASKS)}.")
    task = hf_task or task_for_architecture(architecture)
    auto_name, output, output_kind = HF_TASKS[task]
    if task == "sequence-classification" and int(getattr(config, "num_labels", 2)) == 1:
        output_kind = "regression"  # one output unit: transformers' regression head
    try:
        model = getattr(transformers, auto_name).from_pretrained(
            str(path), local_files_only=True, use_safetensors=True
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise CorruptModelError(
            f"Cannot load the Hugging Face model in {path} offline as {task} ({auto_name}): "
            f"{str(exc).splitlines()[0][:200]}"
        ) from exc
    if getattr(tokenizer, "pad_token", None) is not None:
        encoded = tokenizer(TEXT_PROBES, padding=True, return_tensors="np")
    else:
        # GPT-2-style tokenizers have no pad token; one probe needs no padding
        encoded = tokenizer(TEXT_PROBES[:1], return_tensors="np")
    feeds = {k: np.asarray(encoded[k]).astype(np.int64) for k in ("input_ids", "attention_mask")}
    metadata: dict[str, Any] = {
        "hf_directory": str(path),
        "hf_task": task,
        "architecture": architecture or type(model).__name__,
        "loaded_class": type(model).__name__,
        "output_kind": output_kind,
        "hidden_size": int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 0),
    }
    labels = getattr(config, "id2label", None)
    if task in ("sequence-classification", "token-classification") and labels:
        metadata["labels"] = [str(labels[i]) for i in sorted(labels)]
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        metadata["pad_with"] = "eos"  # batches of text are padded with eos (masked out) where they must be
    return LoadedHF(HFOutput(model, output), feeds, output, metadata)
