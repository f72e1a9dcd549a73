"""Splitting as a deployment choice (issue 19, item 5): once `optimize` has chosen a model, where
should it be cut between this device and a server on the user's stated network?

The slicing cost model of :mod:`compactai.techniques.slice.placement` answers it with measured
parts (head and tail latency on this machine, the bytes each cut sends, the server's per-request
overhead); the answer goes into results.json (``split``) and the report. The search itself is not
changed: the split is a property of how the chosen model is deployed, not of the model.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from compactai.techniques.slice.placement import SliceConfig, check_network, placement_report, profile_cuts


@dataclass
class NetworkSpec:
    """The network between the device and a server (what `--bandwidth-mbps` and friends state)."""

    bandwidth_mbps: float
    rtt_ms: float
    server_speedup: float = 1.0
    server_overhead_ms: float = 0.0  # per request, besides the tail (measured by the CLI on a real server)

    def check(self) -> None:
        check_network(self.bandwidth_mbps, self.rtt_ms, self.server_speedup)


def split_choice(model_path: Path, samples: dict[str, np.ndarray], network: NetworkSpec, *,
                 threads: int | None = None, max_cuts: int = 8, rounds: int = 2,
                 progress: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """The cut the slicing cost model chooses for ``model_path`` on ``network`` (raw tensors on
    the wire), with the figures behind it and how the choice moves a decade either side."""
    network.check()
    work = Path(tempfile.mkdtemp(prefix="compactai-split-"))
    try:
        config = SliceConfig(max_cuts=max_cuts, rounds=rounds, threads=threads, compressions=("raw",))
        profiles = profile_cuts(model_path, samples, config, work, progress=progress)
        report = placement_report(profiles, bandwidth_mbps=network.bandwidth_mbps, rtt_ms=network.rtt_ms,
                                  server_speedup=network.server_speedup, device_memory_mb=None, modes=("raw",),
                                  server_overhead_ms=network.server_overhead_ms)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    choice = report["choice"]
    return {
        "network": asdict(network),
        "choice": {"cut": choice["cut"]["label"], "kind": choice["cut"]["kind"], "tensors": choice["cut"]["tensors"],
                   **{k: choice[k] for k in ("head_ms", "transfer_ms", "overhead_ms", "tail_ms", "end_to_end_ms")}},
        "choice_by_bandwidth": report["choice_by_bandwidth"],
        "cuts": [{"cut": row["cut"]["label"], "kind": row["cut"]["kind"], "head_ms": row["head_ms"]["raw"],
                  "tail_ms": row["tail_ms"]["raw"], "request_bytes": row["request_bytes"].get("raw"),
                  "end_to_end_ms": row["end_to_end_ms"]["raw"]} for row in report["cuts"]],
        "cost_model": report["assumptions"]["cost_model"],
        "how": "`compactai slice model.onnx --bandwidth-mbps B --rtt-ms R -o OUT` writes head.onnx and tail.onnx "
               "for this cut; `compactai slice run OUT --remote URL` runs them",
    }
