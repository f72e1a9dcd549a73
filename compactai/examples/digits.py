"""The `digits` example: an over-sized residual CNN trained on scikit-learn's bundled digits.

The 8x8 images are upsampled to 32x32 and the teacher is deliberately large (about 1.1M
parameters), like the models users bring, so scaling it down has real work to do. The
split is fixed and seeded; the trained weights are cached (safetensors) under the user
cache dir and retrained only when the recipe below changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from compactai.models.zoo import digits_resnet
from compactai.tasks import Accuracy, Split, Task

log = logging.getLogger(__name__)

SEED = 0
IMAGE_SIZE = 32
WIDTHS = (40, 80, 160)
EPOCHS = 15
RECIPE = {"seed": SEED, "image_size": IMAGE_SIZE, "widths": WIDTHS, "epochs": EPOCHS, "version": 1}


def load_digits_splits(seed: int = SEED) -> dict[str, Split]:
    """Fixed train/calibration/validation/test splits of sklearn's digits, as float32 NCHW 32x32."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    small = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    upsampled = F.interpolate(small, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    images = ((upsampled - 0.5) / 0.5).numpy().astype(np.float32)
    labels = data.target.astype(np.int64)
    index = np.arange(len(labels))
    train_idx, test_idx = train_test_split(index, test_size=0.2, random_state=seed, stratify=labels)
    train_idx, val_idx = train_test_split(train_idx, test_size=0.125, random_state=seed, stratify=labels[train_idx])
    calibration_idx = np.random.default_rng(seed).choice(train_idx, size=256, replace=False)

    def split(idx: np.ndarray) -> Split:
        return Split({"image": images[idx]}, labels[idx])

    return {
        "train": split(train_idx),
        "calibration": split(calibration_idx),
        "validation": split(val_idx),
        "test": split(test_idx),
    }


def augment(batch: Any, generator: Any) -> Any:
    """Random shifts of up to 2 pixels: cheap, and enough to make the CNN robust on 1.4k images."""
    import torch

    shifts = torch.randint(-2, 3, (2,), generator=generator).tolist()
    return torch.roll(batch, shifts=shifts, dims=(2, 3))


def train_classifier(
    model: Any,
    splits: dict[str, Split],
    epochs: int,
    seed: int = SEED,
    lr: float = 2e-3,
    batch_size: int = 64,
    progress: Any = None,
) -> float:
    """Train with AdamW + one-cycle on the train split; returns validation accuracy of the best epoch
    (whose weights are restored)."""
    import copy

    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(splits["train"].inputs["image"])
    y = torch.from_numpy(splits["train"].labels)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    best, best_state = -1.0, None
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(augment(x[idx], generator)), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        accuracy = torch_accuracy(model, splits["validation"])
        if accuracy >= best:
            best, best_state = accuracy, copy.deepcopy(model.state_dict())
        if progress is not None:
            progress(epoch + 1, epochs, accuracy)
    model.load_state_dict(best_state)
    model.eval()
    return best


def torch_accuracy(model: Any, split: Split) -> float:
    import torch

    model.eval()
    with torch.inference_mode():
        logits = model(torch.from_numpy(split.inputs["image"]))
    return float((logits.argmax(1).numpy() == split.labels).mean())


def recipe_key() -> str:
    return hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]


def load_or_train_teacher(cache_dir: Path, splits: dict[str, Split], progress: Any = None) -> Any:
    """The trained teacher from the cache, or trained now (about a minute on 2 cores) and cached."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = cache_dir / f"digits-teacher-{recipe_key()}.safetensors"
    if weights.exists():
        return _load_teacher(weights, load_file)
    weights.parent.mkdir(parents=True, exist_ok=True)
    # one trainer per machine: processes that start together (parallel test runs, Ray workers) wait
    # for the first one's weights instead of each training the same teacher on the same cores
    with open(weights.with_suffix(".lock"), "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if weights.exists():
            return _load_teacher(weights, load_file)
        log.info("Training the digits teacher once (cached at %s)", weights)
        torch.manual_seed(SEED)
        model = digits_resnet(WIDTHS)
        train_classifier(model, splits, EPOCHS, progress=progress)
        tmp = weights.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.replace(weights)
        return model


def _load_teacher(weights: Path, load_file: Any) -> Any:
    model = digits_resnet(WIDTHS)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    return model


def digits_task(splits: dict[str, Split]) -> Task:
    return Task(name="digits", metric=Accuracy(), splits=splits, eval_split="test", batch_size=256)
