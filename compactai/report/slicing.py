"""The slicing figure: predicted end-to-end latency against bandwidth, one line per cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from compactai.report.figures import CHOSEN, _svg, plt


def bandwidth_svg(result: dict[str, Any]) -> str:
    """End-to-end ms (cost model, measured parts) over a log bandwidth axis; the stated bandwidth
    is a vertical line and the chosen cut is drawn thick."""
    assumptions = result["assumptions"]
    stated = assumptions["bandwidth_mbps"]
    rtt, speedup = assumptions["rtt_ms"], assumptions["server_speedup"]
    overhead = assumptions.get("server_overhead_ms") or 0.0
    grid = np.logspace(np.log10(stated / 100), np.log10(stated * 100), 60)
    chosen = result["choice"]
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for index, row in enumerate(result["cuts"]):
        mode = chosen["compression"] if chosen["compression"] in row["tail_ms"] else "raw"
        head, tail = row["head_ms"][mode], row["tail_ms"][mode] / speedup
        sent = (row.get("request_bytes") or {}).get(mode) or row["tensor_bytes"][mode]
        if row["cut"]["kind"] == "all-local":
            values = np.full_like(grid, head)
        else:
            values = head + tail + rtt + overhead + sent * 8 / (grid * 1e6) * 1e3
        is_chosen = index == chosen["index"]
        label = row["cut"]["label"]
        ax.plot(grid, values, color=CHOSEN if is_chosen else None, linewidth=2.5 if is_chosen else 1,
                label=(label[:40] + ("..." if len(label) > 40 else "")) + (" (chosen)" if is_chosen else ""))
    ax.axvline(stated, color="#555555", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("uplink bandwidth (Mbit/s)")
    ax.set_ylabel("predicted end-to-end latency (ms)")
    ax.set_title(f"Cut choice vs bandwidth (RTT {rtt} ms, server speed-up {speedup}x)")
    ax.legend(fontsize=6, loc="upper right", ncol=2)
    return _svg(fig)


def write_bandwidth_svg(result: dict[str, Any], path: Path) -> Path:
    path.write_text(bandwidth_svg(result))
    return path
