"""The channel multiple this CPU's convolution kernels like, measured once per CPU and cached.

ONNX Runtime's CPU convolutions work on channel blocks (NCHWc: 8 floats with AVX2, 16 with
AVX-512). Pruning to odd channel counts (10, 58, 87) leaves blocks part-empty and can make a model
with fewer MACs slower than its parent, so pruned channel counts are rounded to a multiple.
Which multiple, 8 or 16, is measured: a stack of pointwise and depthwise convolutions (a
MobileNetV2 block) at ``16k - 8`` channels against ``16k`` channels, timed on ONNX Runtime in
interleaved rounds. If the 8 extra channels cost next to nothing, rounding to 16 keeps them
for free (16); if they cost their share, rounding to 8 saves it (8). The result is cached in
``$COMPACTAI_CACHE_DIR`` (or the user cache dir) keyed by CPU model, threads and ORT version.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CHOICES = (8, 16)
PAIRS = (40, 56, 88)  # 16k - 8 channel counts; each is compared with +8 channels
FREE = 0.5  # the 8 extra channels are "free" when they cost under half their share of the time


def cache_file() -> Path:
    env = os.environ.get("COMPACTAI_CACHE_DIR")
    if env:
        return Path(env) / "round-to.json"
    import platformdirs

    return Path(platformdirs.user_cache_dir("compactai")) / "round-to.json"


def _key(threads: int) -> str:
    import onnxruntime

    from compactai.measure.environment import cpu_info

    return f"{cpu_info()['model']}|threads={threads}|onnxruntime={onnxruntime.__version__}"


def _block(channels: int, path: Path) -> Path:
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(channels, channels, 1), nn.ReLU6(), nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
        nn.ReLU6(), nn.Conv2d(channels, channels, 1), nn.ReLU6(), nn.Conv2d(channels, channels, 1),
    ).eval()
    torch.onnx.export(model, (torch.zeros(1, channels, 16, 16),), str(path), input_names=["x"], dynamo=False)
    return path


def _time(session: Any, feed: dict[str, np.ndarray], seconds: float) -> float:
    for _ in range(5):
        session.run(None, feed)
    samples: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(samples) < 20:
        start = time.perf_counter()
        session.run(None, feed)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure_round_to(threads: int, rounds: int = 5, seconds: float = 0.1) -> dict[str, Any]:
    """Time the block at each ``16k - 8`` and ``16k`` channels (interleaved rounds) and pick 8 or 16."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    ratios: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="compactai-round-") as work:
        for low in PAIRS:
            sessions, feeds = [], []
            for channels in (low, low + 8):
                path = _block(channels, Path(work) / f"block{channels}.onnx")
                sessions.append(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))
                feeds.append({"x": np.random.default_rng(0).standard_normal((1, channels, 16, 16), np.float32)})
            times: list[list[float]] = [[], []]
            for round_number in range(rounds):
                for index in ((0, 1) if round_number % 2 == 0 else (1, 0)):
                    times[index].append(_time(sessions[index], feeds[index], seconds))
            small, large = statistics.median(times[0]), statistics.median(times[1])
            # extra time per extra channel, as a share of the time per channel at the smaller count
            ratios[f"{low}->{low + 8}"] = ((large - small) / 8) / (small / low)
    share = statistics.median(ratios.values())
    return {"round_to": 16 if share < FREE else 8, "extra_channel_cost_share": ratios, "median_share": share,
            "threads": threads, "method": f"median over {PAIRS} of (t(c+8)-t(c))/8 / (t(c)/c); 16 if < {FREE}"}


def default_round_to(threads: int | None = None) -> int:
    """The measured channel multiple for this CPU (cached; measured on first use, a few seconds)."""
    from compactai.measure.runtime import default_threads

    threads = threads or default_threads()
    key = _key(threads)
    path = cache_file()
    cached: dict[str, Any] = {}
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key)
    if isinstance(entry, dict) and entry.get("round_to") in CHOICES:
        return int(entry["round_to"])
    entry = measure_round_to(threads)
    cached[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cached, indent=1))
    except OSError:
        pass  # a read-only cache only costs a re-measurement next time
    return int(entry["round_to"])


__all__ = ["CHOICES", "cache_file", "default_round_to", "measure_round_to"]
