"""What a client does with the model: set weights, train locally, score, and pack its update.

Flower-free on purpose: the ClientApp (``apps.py``), the "clients trained alone" baseline and
the tests all run these same functions. Local training goes through the shared
``TrainingLoop``; FedProx adds its proximal term ``mu/2 * ||w - w_global||^2`` to the loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compactai.tasks import Split
from compactai.techniques._training import TrainingLoop, first_output


def weight_names(module: torch.nn.Module) -> list[str]:
    """The state entries that travel: parameters and float buffers (BatchNorm statistics);
    integer counters such as ``num_batches_tracked`` stay local, since averaging them means nothing."""
    return [name for name, value in module.state_dict().items() if value.is_floating_point()]


def get_weights(module: torch.nn.Module) -> dict[str, np.ndarray]:
    state = module.state_dict()
    return {name: state[name].detach().cpu().numpy().copy() for name in weight_names(module)}


def set_weights(module: torch.nn.Module, weights: dict[str, np.ndarray]) -> None:
    state = module.state_dict()
    for name, value in weights.items():
        state[name].copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)).reshape(state[name].shape))


def _forward(module: torch.nn.Module, feeds: dict[str, np.ndarray]) -> torch.Tensor:
    return first_output(module(*(torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values())))


def train_local(module: torch.nn.Module, data: Split, *, epochs: int, lr: float, batch_size: int, seed: int,
                proximal_mu: float = 0.0) -> dict[str, float]:
    """Train ``module`` in place on ``data`` (SGD with momentum, fresh each round as clients keep no
    optimizer state between rounds); with ``proximal_mu`` > 0 the FedProx term pulls towards the
    weights the round started from. Returns the mean training loss and the sample count."""
    torch.set_num_threads(1)  # clients share 2 cores; one thread each keeps them from fighting
    anchor = [p.detach().clone() for p in module.parameters()] if proximal_mu > 0 else []
    optimizer = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
    assert data.labels is not None
    labels = torch.from_numpy(data.labels.astype(np.int64))

    def batches(epoch: int) -> Iterator[np.ndarray]:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).numpy()
        for start in range(0, len(order), batch_size):
            yield order[start:start + batch_size]

    def step(index: np.ndarray) -> float:
        part = data.take(index)
        loss = F.cross_entropy(_forward(module, part.inputs), labels[torch.from_numpy(index)])
        if anchor:
            loss = loss + proximal_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(module.parameters(), anchor))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    module.train()
    result = TrainingLoop(epochs=epochs, batches=batches, step=step,
                          steps_per_epoch=(len(data) + batch_size - 1) // batch_size).run()
    module.eval()
    losses = [entry["loss"] for entry in result.history if entry["loss"] is not None]
    return {"train_loss": float(np.mean(losses)) if losses else float("nan"), "num-examples": float(len(data))}


def evaluate(module: torch.nn.Module, split: Split, batch_size: int = 256) -> dict[str, float]:
    """Cross-entropy loss and accuracy of ``module`` on a labelled split."""
    module.eval()
    total_loss, correct = 0.0, 0
    assert split.labels is not None
    with torch.inference_mode():
        for feeds, labels in split.batches(batch_size):
            logits = _forward(module, feeds)
            target = torch.from_numpy(np.asarray(labels, dtype=np.int64))
            total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(-1) == target).sum())
    count = max(len(split), 1)
    return {"loss": total_loss / count, "accuracy": correct / count, "num-examples": float(len(split))}


# ---- update compression: the client sends (new - global) in fewer bytes; the server decodes ----

def encode_update(new: dict[str, np.ndarray], start: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """The arrays a client sends for ``new`` weights, given the ``start`` weights of the round.
    ``none``: the weights as float32; ``fp16``: the delta in float16; ``int8``: the delta in int8
    with one float32 scale per tensor (symmetric, max-abs)."""
    if mode == "none":
        return {name: value.astype(np.float32) for name, value in new.items()}
    packed: dict[str, np.ndarray] = {}
    for name, value in new.items():
        delta = value.astype(np.float32) - start[name].astype(np.float32)
        if mode == "fp16":
            packed[name] = delta.astype(np.float16)
            continue
        peak = float(np.abs(delta).max()) if delta.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        packed[name] = np.clip(np.round(delta / scale), -127, 127).astype(np.int8)
        packed[name + "::scale"] = np.array([scale], dtype=np.float32)
    return packed


def decode_update(packed: dict[str, np.ndarray], start: dict[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """The float32 weights that ``encode_update`` packed."""
    if mode == "none":
        return {name: np.asarray(packed[name], dtype=np.float32) for name in start}
    if mode == "fp16":
        return {name: start[name] + packed[name].astype(np.float32) for name in start}
    return {name: start[name] + packed[name].astype(np.float32) * float(packed[name + "::scale"][0]) for name in start}


def payload_bytes(arrays: dict[str, Any]) -> int:
    """Bytes of the array data a message carries (what compression shrinks)."""
    return int(sum(np.asarray(v).nbytes for v in arrays.values()))
