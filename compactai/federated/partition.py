"""Splitting a task's training data across clients: IID or Dirichlet label skew.

Label skew follows Hsu et al. (2019): for each class, the share each client gets is drawn from
Dirichlet(alpha, ..., alpha); small alpha gives each client few classes. Every client keeps
at least ``min_size`` samples (the draw is repeated until it does), and each client's own share
is split again into its training part and a held-out part for federated evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compactai.errors import ParameterError
from compactai.tasks import Split


@dataclass
class ClientData:
    """One client's data: what it trains on and what it scores the global model on."""

    train: Split
    holdout: Split

    def label_counts(self, classes: int) -> list[int]:
        assert self.train.labels is not None
        labels = np.concatenate([self.train.labels, self.holdout.labels if self.holdout.labels is not None else []])
        return np.bincount(labels.astype(np.int64), minlength=classes).tolist()


def partition_indices(labels: np.ndarray, clients: int, alpha: float | None, seed: int, min_size: int = 10,
                      tries: int = 100) -> list[np.ndarray]:
    """Sample indices per client: IID when ``alpha`` is None, else Dirichlet label skew."""
    rng = np.random.default_rng(seed)
    if len(labels) < clients * min_size:
        raise ParameterError(f"{len(labels)} training samples are too few for {clients} clients of at least "
                             f"{min_size} samples each; use fewer clients.")
    if alpha is None:
        order = rng.permutation(len(labels))
        return [np.sort(part) for part in np.array_split(order, clients)]
    classes = np.unique(labels)
    for _ in range(tries):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts]
    raise ParameterError(f"A Dirichlet label skew with alpha {alpha} left some client with fewer than {min_size} "
                         f"samples in {tries} draws; use a larger alpha or fewer clients.")


def split_clients(train: Split, clients: int, alpha: float | None, seed: int, holdout: float) -> list[ClientData]:
    """The task's training split cut into ``clients`` parts, each with its held-out share."""
    if train.labels is None:
        raise ParameterError("Federated training needs a labelled training split; this task's has no labels.")
    result = []
    rng = np.random.default_rng(seed + 1)
    for indices in partition_indices(train.labels, clients, alpha, seed):
        shuffled = rng.permutation(indices)
        cut = max(1, round(len(shuffled) * holdout))
        result.append(ClientData(train=train.take(np.sort(shuffled[cut:])), holdout=train.take(np.sort(shuffled[:cut]))))
    return result
