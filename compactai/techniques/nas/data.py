"""A labelled classification task for NAS from an .npz of '<split>/<input>' and '<split>/labels' arrays.

NAS has no model to start from, so the task is read from the data alone: one input array per split
(train, validation, test) and integer labels; read without pickle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compactai.errors import BadInputError, ModelNotFoundError
from compactai.tasks import Accuracy, Split, Task

NAS_SPLITS = ("train", "validation", "test")


def labelled_task(path: str | Path) -> Task:
    """The Task of ``path``: splits train/validation/test, each with one float input and labels."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"Data file {path} does not exist; give an .npz with train/, validation/ and test/ "
                                 "arrays: '<split>/<input>' (float) and '<split>/labels' (integers).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (ValueError, OSError, EOFError) as exc:
        raise BadInputError(f"Cannot read {path} as a numpy .npz without pickle: {str(exc)[:200]}") from None
    names = sorted({key.split("/", 1)[1] for key in arrays if key.startswith("train/") and key != "train/labels"})
    if len(names) != 1:
        raise BadInputError(f"{path} must hold exactly one input array per split (e.g. 'train/image'); found {names}.")
    name = names[0]
    splits = {}
    for split in NAS_SPLITS:
        inputs, labels = arrays.get(f"{split}/{name}"), arrays.get(f"{split}/labels")
        if inputs is None or labels is None:
            raise BadInputError(f"{path} lacks '{split}/{name}' or '{split}/labels'; NAS needs labelled train, "
                                "validation and test splits.")
        if inputs.dtype.kind != "f" or not np.isfinite(inputs).all():
            raise BadInputError(f"{path}: '{split}/{name}' must hold finite floats; got {inputs.dtype}.")
        if labels.dtype.kind not in "iu" or labels.shape != (len(inputs),) or len(inputs) == 0 or labels.min() < 0:
            raise BadInputError(f"{path}: '{split}/labels' must be one non-negative integer per row of '{split}/{name}'.")
        splits[split] = Split({name: inputs.astype(np.float32)}, labels.astype(np.int64))
    return Task(name=path.stem, metric=Accuracy(), splits=splits, eval_split="test", batch_size=256)


__all__ = ["labelled_task"]
