"""Tiny Hugging Face directories as users bring them: a BERT sequence classifier (with the
packaged MiniLM's WordPiece tokenizer) and a GPT-2 language model (with a byte-level BPE
tokenizer trained here, offline). Weights are seeded random; saved as safetensors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

SENTENCES = [
    "compactai scales models down so they run locally.",
    "The quick brown fox jumps over the lazy dog.",
    "Quantization stores weights as small integers.",
    "A budget names latency, size and the quality to keep.",
    "Pruning removes channels that matter least.",
    "Distillation trains a small student from a large teacher.",
    "Bundles are signed so devices can verify them.",
    "Every figure is measured on the runtime that runs the model.",
    "Calibration data sets the ranges of activations.",
    "Attention masks hide the padding of short sentences.",
    "The server answers requests over HTTP on the loopback address.",
    "Small models are cheaper to serve and faster to update.",
]


def texts(n: int, seed: int = 0) -> list[str]:
    """``n`` short sentences of varied length made from the words above (seeded)."""
    rng = np.random.default_rng(seed)
    words = " ".join(SENTENCES).replace(".", "").split()
    return [" ".join(rng.choice(words, size=int(rng.integers(3, 14)))) + "." for _ in range(n)]


def minilm_tokenizer_files(target: Path) -> None:
    from compactai.examples.minilm import model_directory

    source = model_directory()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (source / name).exists():
            shutil.copyfile(source / name, target / name)


KEYWORDS = ("model", "models", "quantization", "pruning", "budget")


def keyword_labels(sentences: list[str]) -> np.ndarray:
    """1 for a sentence naming one of KEYWORDS, else 0: a task a tiny encoder learns in seconds."""
    return np.array([int(any(w in s.lower().split() for w in KEYWORDS)) for s in sentences], np.int64)


def bert_classifier_dir(path: Path, labels: int = 2, layers: int = 2, hidden: int = 32, seed: int = 0,
                        train_steps: int = 0) -> Path:
    """A BertForSequenceClassification directory with the MiniLM tokenizer (vocab 30522);
    ``train_steps`` of Adam on :func:`keyword_labels` make its logits depend on the input."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=hidden * 2, max_position_embeddings=128, num_labels=labels,
    )
    model = BertForSequenceClassification(config)
    path.mkdir(parents=True, exist_ok=True)
    minilm_tokenizer_files(path)
    if train_steps:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        sentences = texts(512, seed + 100)
        encoded = tokenizer(sentences, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
        targets = torch.from_numpy(keyword_labels(sentences))
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: one thread is fastest on a shared CPU
        for _ in range(train_steps):
            rows = torch.randint(0, len(sentences), (32,))
            loss = model(input_ids=encoded["input_ids"][rows], attention_mask=encoded["attention_mask"][rows],
                         labels=targets[rows]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        torch.set_num_threads(threads)
    model.eval().save_pretrained(str(path), safe_serialization=True)
    return path


def gpt2_tokenizer(vocab_size: int = 300) -> object:
    """A byte-level BPE tokenizer trained on the sentences above, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def gpt2_dir(path: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """A GPT2LMHeadModel directory with its own byte-level BPE tokenizer (no pad token, as GPT-2 ships)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = gpt2_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=hidden, n_layer=layers, n_head=2,  # type: ignore[arg-type]
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,  # type: ignore[attr-defined]
    )
    model = GPT2LMHeadModel(config).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))  # type: ignore[attr-defined]
    return path


def token_npz(path: Path, tokenizer_dir: Path, labels: int | None = None, sizes: tuple[int, int, int] = (32, 64, 64),
              seed: int = 0) -> Path:
    """An .npz of calibration/validation/test token ids and masks (padded with eos where the
    tokenizer has no pad token), with labels when ``labels`` is given (2: :func:`keyword_labels`,
    more: random)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    for offset, (split, n) in enumerate(zip(("calibration", "validation", "test"), sizes)):
        encoded = tokenizer(texts(n, seed + offset), padding="max_length", max_length=24, truncation=True,
                            return_tensors="np")
        arrays[f"{split}/input_ids"] = encoded["input_ids"].astype(np.int64)
        arrays[f"{split}/attention_mask"] = encoded["attention_mask"].astype(np.int64)
        if labels is not None:
            arrays[f"{split}/labels"] = keyword_labels(texts(n, seed + offset)) if labels == 2 else (
                rng.integers(0, labels, n).astype(np.int64))
    np.savez(path, **arrays)
    return path
