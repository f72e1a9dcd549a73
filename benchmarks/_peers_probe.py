"""Peak memory of an OpenVINO model in a fresh process: load, run 5 queries, print VmHWM in MB.

    python benchmarks/_peers_probe.py MODEL.xml INPUTS.npz THREADS
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def main() -> None:
    import openvino as ov

    model, inputs, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    with np.load(inputs, allow_pickle=False) as data:
        feeds = {name: data[name] for name in data.files}
    names = [port.any_name for port in compiled.inputs]
    for _ in range(5):
        compiled({n: feeds[n] for n in names})
    print(f"{peak_mb():.1f}")


if __name__ == "__main__":
    main()
