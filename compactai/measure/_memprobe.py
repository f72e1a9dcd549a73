"""Subprocess half of the peak-memory measurement. Imports only numpy and one runtime.

usage: python _memprobe.py onnxruntime|openvino|torch MODEL INPUTS.npz --threads N --runs R
Prints {"peak_mb": ..., "base_mb": ...}: peak RSS (VmHWM), and RSS after importing the runtime.
"""

import argparse
import json
import os
import resource
import sys
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """VmHWM of this process. Not ru_maxrss: Linux carries that over from the forking parent
    across exec, so a child of a large process would report the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("runtime")
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", default="{}", help="openvino: compile settings as JSON")
    args = parser.parse_args()
    with np.load(args.inputs, allow_pickle=False) as data:
        feeds = {k: data[k] for k in data.files}
    if args.runtime == "onnxruntime":
        import onnxruntime as ort

        base = rss_mb()
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
        for _ in range(args.runs):
            session.run(None, feeds)
    elif args.runtime == "openvino":
        # run as a script, this file's directory is first on sys.path, and it holds compactai's own
        # openvino.py: import the package, not that module
        here = Path(__file__).resolve().parent
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
        import openvino as ov

        base = rss_mb()
        core = ov.Core()
        # the settings of compactai's OpenVINO runner (measure/openvino.py, passed by the parent as JSON),
        # so the figure is the served model's
        compiled = core.compile_model(core.read_model(args.model), "CPU", json.loads(args.config))
        request = compiled.create_infer_request()
        for _ in range(args.runs):
            request.infer(feeds)
    else:
        import torch

        torch.set_num_threads(args.threads)
        base = rss_mb()
        from compactai.models.pt2_archive import load_checked_program

        # the same loader as load_model: archive checked, every torch.load weights-only
        module = load_checked_program(Path(args.model)).module()
        tensors = [torch.from_numpy(v) for v in feeds.values()]
        with torch.inference_mode():
            for _ in range(args.runs):
                module(*tensors)
    peak = peak_rss_mb()
    print(json.dumps({"peak_mb": peak, "base_mb": base}))


if __name__ == "__main__":
    main()
