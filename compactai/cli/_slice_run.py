"""Output of `compactai slice`: the cut table, the files of the chosen cut, and `slice run`."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from compactai.cli._common import Output, table
from compactai.errors import BadInputError, CompactAIError, ModelNotFoundError
from compactai.results import to_jsonable

TAIL_NAME = "tail"


def measure_server_overhead(work: Path, say: Any, queries: int = 30) -> float:
    """The per-request cost of `compactai serve` on this machine (ms): the median round trip of
    ``/infer`` on a one-element model, against a real server process on 127.0.0.1."""
    from compactai.techniques.slice.runner import measure_request_overhead, overhead_model

    say("measuring the server's per-request overhead (a one-element model on `compactai serve`)")
    model = work / "overhead.onnx"
    model.write_bytes(overhead_model())
    process = subprocess.Popen([sys.executable, "-m", "compactai.cli", "serve", str(model), "--port", "0",
                                "--name", "overhead", "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise CompactAIError("`compactai serve` did not start to measure the server overhead; give "
                                 "--server-overhead-ms MS instead.")
        url = f"http://127.0.0.1:{json.loads(line)['port']}"
        # the server logs one line per event; drain them so a full pipe never blocks it
        threading.Thread(target=process.stdout.read, daemon=True).start()
        return statistics.median(measure_request_overhead(url, "overhead", queries))
    finally:
        process.terminate()
        process.wait(timeout=30)


def write_profile(out: Output, profiles: list[Any], output: Path, info: dict[str, Any],
                  server_overhead_ms: float) -> None:
    """`--profile-only`: every cut's tail latency on this machine and the server's per-request
    overhead here, for `--server-profile` on the device."""
    from compactai.techniques.slice.placement import profile_key

    output.mkdir(parents=True, exist_ok=True)
    tail_ms = {profile_key(p.cut, mode): ms for p in profiles for mode, ms in p.tail_ms.items()}
    data = {"source": info, "tail_ms": tail_ms, "server_overhead_ms": server_overhead_ms,
            "cuts": [p.to_dict() for p in profiles]}
    (output / "profile.json").write_text(json.dumps(to_jsonable(data), indent=2))
    out.console.print(f"wrote {output / 'profile.json'} ({len(tail_ms)} tail timings, server overhead "
                      f"{server_overhead_ms:.3f} ms per request)", highlight=False)
    out.emit({"profile": str(output / "profile.json"), "tail_ms": tail_ms, "server_overhead_ms": server_overhead_ms})


def write_placement(out: Output, profiles: list[Any], model_path: Path, samples: dict[str, np.ndarray],
                    output: Path, info: dict[str, Any], *, bandwidth_mbps: float, rtt_ms: float,
                    server_speedup: float, limit: float | None, modes: tuple[str, ...],
                    server: dict[str, float] | None, config: Any, server_overhead_ms: float) -> None:
    from compactai.report.slicing import write_bandwidth_svg
    from compactai.techniques.slice.placement import placement_report

    result = placement_report(profiles, bandwidth_mbps=bandwidth_mbps, rtt_ms=rtt_ms, server_speedup=server_speedup,
                              device_memory_mb=limit, modes=modes, server_profile=server,
                              server_overhead_ms=server_overhead_ms)
    output.mkdir(parents=True, exist_ok=True)
    for stale in ("head.onnx", "tail.onnx"):
        (output / stale).unlink(missing_ok=True)
    choice = result["choice"]
    chosen = profiles[choice["index"]]
    head, tail = chosen.parts[choice["compression"]]
    if head.path is not None:
        shutil.copy(head.path, output / "head.onnx")
    if tail.path is not None:
        shutil.copy(tail.path, output / "tail.onnx")
    shutil.copy(model_path, output / "model.onnx")
    np.savez(output / "inputs.npz", allow_pickle=False, **samples)
    result["deployment"] = {
        "head": "head.onnx" if head.path is not None else None,
        "tail": "tail.onnx" if tail.path is not None else None,
        "tail_model_name": TAIL_NAME, "inputs": head.inputs, "sent": head.outputs, "outputs": tail.outputs,
        "compression": choice["compression"], "cut": chosen.cut.to_dict(),
    }
    result["source"] = info
    result["measurement"] = {"runtime": "onnxruntime", "threads": config.threads, "rounds": config.rounds,
                             "min_queries": config.min_queries, "batch": 1}
    written = {"slice_json": output / "slice.json", "plot": output / "slice.svg", "model": output / "model.onnx",
               "inputs": output / "inputs.npz"}
    if head.path is not None:
        written["head"] = output / "head.onnx"
    if tail.path is not None:
        written["tail"] = output / "tail.onnx"
    result["written"] = {k: str(v) for k, v in written.items()}
    write_bandwidth_svg(result, output / "slice.svg")
    (output / "slice.json").write_text(json.dumps(to_jsonable(result), indent=2))
    print_placement(out, result)
    out.emit(result)


def print_placement(out: Output, result: dict[str, Any]) -> None:
    sweep = [f"{bw:g}" for bw in result["assumptions"]["bandwidths_mbps"]]
    rows = []
    for index, row in enumerate(result["cuts"]):
        for mode in row["tail_ms"]:
            fidelity = row["fidelity"][mode]
            cost = fidelity.get("argmax_agreement", fidelity.get("cosine_mean"))
            label = row["cut"]["label"]
            rows.append([f"{index}:{mode}", label if len(label) <= 48 else label[:45] + "...", row["head_ms"][mode],
                         row["tensor_bytes"][mode] / 1024, row["tail_ms"][mode], fidelity["max_abs_diff"], cost,
                         row["head_memory_mb"], *[row["end_to_end_ms"][mode][bw] for bw in sweep]])
    assumptions = result["assumptions"]
    out.console.print(table(
        f"Cuts (RTT {assumptions['rtt_ms']} ms, server overhead {assumptions['server_overhead_ms']:.2f} ms per "
        f"request, server speed-up {assumptions['server_speedup']}x; end-to-end predicted from measured parts)",
        ["cut:wire", "tensors", "head ms", "sent KB", "tail ms (here)", "max|diff|", "agree/cos", "head MB",
         *[f"e2e ms @{bw} Mbit/s" for bw in sweep]], rows))
    choice = result["choice"]
    out.console.print(f"choice at {assumptions['bandwidth_mbps']:g} Mbit/s: [bold]{choice['cut']['label']}[/bold] "
                      f"({choice['compression']}), {choice['end_to_end_ms']:.3f} ms end-to-end "
                      f"(head {choice['head_ms']:.3f} + transfer {choice['transfer_ms']:.3f} + server overhead "
                      f"{choice['overhead_ms']:.3f} + tail {choice['tail_ms']:.3f})", highlight=False)
    moves = "; ".join(f"{bw} Mbit/s -> {c['cut']} ({c['compression']}, {c['end_to_end_ms']:.3f} ms)"
                      for bw, c in result["choice_by_bandwidth"].items())
    out.console.print(f"note: the choice by bandwidth: {moves}", highlight=False)
    out.console.print(f"wrote {', '.join(result['written'].values())}", highlight=False)


def run_slice(out: Output, out_dir: str | None, remote: str | None, model_name: str | None, data: Path | None,
              bandwidth_mbps: float | None, threads: int | None) -> None:
    """`compactai slice run OUT --remote URL`: head here, tail remote; compared with the unsplit model."""
    import onnxruntime as ort

    from compactai.techniques.slice.runner import SplitRunner

    if out_dir is None:
        raise BadInputError("Usage: compactai slice run OUT --remote URL (OUT is the directory `compactai slice` wrote).")
    directory = Path(out_dir)
    if not (directory / "slice.json").exists():
        raise ModelNotFoundError(f"{directory / 'slice.json'} does not exist; run `compactai slice MODEL -o {directory}`.")
    inputs_path = data or directory / "inputs.npz"
    with np.load(inputs_path, allow_pickle=False) as loaded:
        feeds = {k: loaded[k] for k in loaded.files}
    with SplitRunner(directory, remote, model_name=model_name, bandwidth_mbps=bandwidth_mbps, threads=threads) as runner:
        outputs = runner.run(feeds)
        timing = runner.last
    session = ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    reference = dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))
    diff = max(float(np.max(np.abs(outputs[n].astype(np.float64) - reference[n]))) for n in names)
    plan = runner.plan
    result = {"rows": len(next(iter(feeds.values()))), "max_abs_diff": diff, "compression": plan["compression"],
              "cut": plan["cut"]["label"], "remote": remote, "timing_ms": timing and timing.__dict__,
              "outputs": {n: list(outputs[n].shape) for n in names}}
    out.console.print(f"ran {result['rows']} rows: head here, tail at {remote or '(none: all-local)'}; cut "
                      f"{result['cut']} ({plan['compression']}); max abs diff vs the unsplit model {diff:.3g}",
                      highlight=False)
    out.emit(result)


def run_partition(out: Output, model_path: Path, samples: dict[str, np.ndarray], parts: int, limits: list[float],
                  config: Any, output: Path, work: Path, say: Any, info: dict[str, Any]) -> None:
    from compactai.techniques.slice.partition import partition

    result = partition(model_path, samples, parts, limits, config, work / "partition", progress=say)
    output.mkdir(parents=True, exist_ok=True)
    for index, part in enumerate(result["parts"]):
        target = output / f"part{index + 1}.onnx"
        shutil.copy(part.pop("path"), target)
        part["file"] = str(target)
    result["source"] = info
    (output / "partition.json").write_text(json.dumps(to_jsonable(result), indent=2))
    rows = [[i + 1, p["first_tensors"], p["weights_mb"], p["measured_memory_mb"], p["limit_mb"], p["latency_ms"]]
            for i, p in enumerate(result["parts"])]
    out.console.print(table(f"{parts}-part partition (objective: {result['objective']})",
                            ["part", "inputs", "weights MB", "measured MB", "limit MB", "ms"], rows))
    out.console.print(f"slowest stage {result['slowest_stage_ms']:.3f} ms, sum {result['sum_ms']:.3f} ms; composed "
                      f"parts vs the model: max abs diff {result['max_abs_diff']:.3g}", highlight=False)
    out.emit(result)
