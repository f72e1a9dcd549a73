"""Pruning a user's ONNX model (issue 15): is the pruned MobileNetV2-style CNN faster at batch 1?

The full-width MobileNetV2-style CNN of the test zoo (tests/zoo/users.py, width 1.0) is trained on
digits and saved with ``torch.onnx.export``, as a user would. The ONNX file is converted to an
nn.Module with onnx2torch (parity-checked), 40% of the channels of every prunable group are
removed (l2), the model fine-tunes 3 epochs on the train half, and is exported again. Variants:
channel counts not rounded (``round_to=1``, what the issue reported), rounded to 8, to 16, and the
measured default of this CPU. Every variant and the unpruned ONNX file are timed at batch 1 on
ONNX Runtime in interleaved rounds (each round visits every model; medians over rounds).

Run:  flock /tmp/compactai-bench.lock nice -n -10 .venv/bin/python benchmarks/pruning_users.py [--rounds 15]
Writes benchmarks/results/pruning_users.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from compactai import load_model
from compactai.cli._common import task_from_data
from compactai.measure import MeasureConfig, count_macs, interleaved_latency
from compactai.measure.environment import environment
from compactai.measure.runtime import default_threads
from compactai.techniques import Context, create_technique
from compactai.techniques.prune.convert import prunable_handle
from compactai.techniques.prune.rounding import default_round_to, measure_round_to

ROOT = Path(__file__).resolve().parents[1]


def data_with_train(model: Any, path: Path) -> Path:
    """The zoo's data.npz plus the train half the model was trained on (for the fine-tune)."""
    arrays = dict(np.load(model.data, allow_pickle=False))
    half = len(model.x) // 2
    arrays["train/input"], arrays["train/labels"] = model.x[:half], model.y[:half]
    np.savez(path, **arrays)
    return path


def channel_counts(handle: Any) -> list[int]:
    from torch import nn

    return [m.out_channels for m in handle.module.modules() if isinstance(m, nn.Conv2d)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    import sys

    sys.path.insert(0, str(ROOT))
    from tests.zoo.users import build

    load_before = os.getloadavg()
    threads = default_threads()
    work = Path(tempfile.mkdtemp(prefix="compactai-prune-users-"))
    started = time.monotonic()
    model = build("mobilenet", work, width=args.width)
    source = load_model(model.onnx)
    handle = prunable_handle(source)
    task = task_from_data(data_with_train(model, work / "data.npz"), handle)
    rounding = measure_round_to(threads)
    chosen = default_round_to(threads)
    variants: dict[str, Any] = {"unpruned (user's ONNX)": source}
    details: dict[str, Any] = {"unpruned (user's ONNX)": {"channels": channel_counts(handle), "macs": count_macs(source),
                                                           "accuracy": task.baseline}}
    for round_to in dict.fromkeys((1, 8, 16, chosen)):
        label = f"pruned, round_to={round_to}" + (" (measured default)" if round_to == chosen else "")
        technique = create_technique("structured_prune", ratio=args.ratio, target="channels", criterion="l2",
                                     round_to=round_to, finetune_epochs=args.epochs)
        pruned = technique.apply(handle, Context(task=task, seed=0))
        onnx_handle = pruned.to_onnx(work / f"pruned-{round_to}.onnx")
        from compactai.measure import make_runner

        accuracy = task.evaluate(make_runner(onnx_handle, "onnxruntime", threads)).value
        variants[label] = onnx_handle
        details[label] = {"channels": channel_counts(pruned), "macs": count_macs(pruned), "accuracy": accuracy}
    config = MeasureConfig(min_queries=200, min_seconds=0.3, warmup=20, threads=threads)
    timed = interleaved_latency(list(variants.values()), config, args.rounds)
    base_p50 = timed[0]["latency_p50_ms"]
    rows = []
    for (label, _), figures in zip(variants.items(), timed):
        info = details[label]
        rows.append({"model": label, "p50_ms": figures["latency_p50_ms"], "p90_ms": figures["latency_p90_ms"],
                     "speedup_vs_unpruned": base_p50 / figures["latency_p50_ms"], "macs": info["macs"],
                     "accuracy": info["accuracy"], "conv_channels": info["channels"],
                     "rounds_ms": figures["latency_rounds_ms"]})
    print(f"MobileNetV2-style CNN (width {args.width}), ONNX, {args.ratio:.0%} of channels pruned, "
          f"ORT batch 1, {threads} threads, {args.rounds} interleaved rounds")
    print(f"{'model':42} {'p50 ms':>8} {'p90 ms':>8} {'speed-up':>9} {'MACs':>10} {'accuracy':>9}")
    for row in rows:
        print(f"{row['model']:42} {row['p50_ms']:8.4f} {row['p90_ms']:8.4f} {row['speedup_vs_unpruned']:8.2f}x "
              f"{row['macs']:>10,} {row['accuracy']:9.4f}")
    print(f"measured channel multiple for this CPU: {chosen} ({rounding['extra_channel_cost_share']})")
    result = {"benchmark": "pruning_users", "ratio": args.ratio, "width": args.width, "rounds": args.rounds,
              "threads": threads, "finetune_epochs": args.epochs, "rows": rows, "round_to_measurement": rounding,
              "round_to_default": chosen, "seconds": round(time.monotonic() - started, 1),
              "load_average": {"before": load_before, "after": os.getloadavg()}, "environment": environment()}
    out = ROOT / "benchmarks" / "results" / "pruning_users.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
