"""`compactai slice`: choose where to split a model between this device and a server, by measurement;
`--parts K` splits it under per-device memory limits; `compactai slice run OUT --remote URL` runs it."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import typer

from compactai.cli._common import (
    EXAMPLE_OPTION,
    HF_TASK_OPTION,
    JSON_OPTION,
    Output,
    app,
    resolve_model,
    table,
)
from compactai.errors import BadInputError, ModelNotFoundError


@app.command(name="slice")
def slice_command(
    path: str | None = typer.Argument(None, help="Model (.onnx, .pt2, HF directory), or `run` to run a slice."),
    out_dir: str | None = typer.Argument(None, help="With `run`: the directory `compactai slice -o` wrote."),
    example: str | None = EXAMPLE_OPTION,
    hf_task: str | None = HF_TASK_OPTION,
    data: Path | None = typer.Option(None, "--data", help=".npz of model inputs by input name (rows = samples)."),
    bandwidth_mbps: float | None = typer.Option(None, "--bandwidth-mbps", help="Uplink bandwidth, Mbit/s."),
    rtt_ms: float | None = typer.Option(None, "--rtt-ms", help="Round-trip time to the server, ms."),
    device_memory_mb: str | None = typer.Option(None, "--device-memory-mb", help="Device memory limit (MB); with "
                                                "--parts, one limit per part: M1,M2,..."),
    server_speedup: float = typer.Option(1.0, "--server-speedup", help="Server runs the tail this many times "
                                                                       "faster than this machine."),
    server_profile: Path | None = typer.Option(None, "--server-profile", help="Tail latencies measured on the "
                                                                               "server (`--profile-only`)."),
    server_overhead_ms: float | None = typer.Option(None, "--server-overhead-ms", help="Per-request cost of the "
                                                    "server and protocol besides the tail (ms); default: from "
                                                    "--server-profile, else measured here with a one-element "
                                                    "model on a real `compactai serve`."),
    profile_only: bool = typer.Option(False, "--profile-only", help="Only measure every cut here and write "
                                                                   "profile.json (run it on the server)."),
    parts: int | None = typer.Option(None, "--parts", help="Split into K consecutive parts under the memory limits."),
    cut: str | None = typer.Option(None, "--cut", help="Force this cut: tensor names, comma-separated."),
    list_cuts: bool = typer.Option(False, "--list-cuts", help="Print the valid cuts and exit."),
    compression: str = typer.Option("raw", "--compression", help="Candidates for the choice: raw, fp16, int8 "
                                                                 "(comma-separated) or all; all are measured."),
    max_tensors: int = typer.Option(2, "--max-tensors", help="Cuts of at most this many tensors."),
    max_cuts: int = typer.Option(12, "--max-cuts", help="Split cuts measured (evenly spaced along the graph)."),
    rounds: int = typer.Option(3, "--rounds", help="Interleaved timing rounds per part."),
    memory: bool = typer.Option(False, "--memory", help="Measure every head's peak memory (implied by "
                                                        "--device-memory-mb)."),
    threads: int | None = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Output directory."),
    remote: str | None = typer.Option(None, "--remote", help="With `run`: URL of the server holding tail.onnx."),
    model_name: str | None = typer.Option(None, "--model-name", help="With `run`: the tail's name on the server."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Split a model across devices: measure every cut (head ms, tensor KB raw/fp16/int8 and its fidelity
    cost, tail ms), predict end-to-end latency for the stated network and write head.onnx, tail.onnx,
    slice.json and slice.svg for the best cut. `compactai slice run OUT --remote URL` runs the result."""
    out = Output(json_output)
    if path == "run":
        from compactai.cli._slice_run import run_slice

        run_slice(out, out_dir, remote, model_name, data, bandwidth_mbps, threads)
        return
    if out_dir is not None:
        raise BadInputError(f"Unexpected argument {out_dir!r}; `compactai slice` takes one MODEL.")
    from compactai.techniques.slice.placement import SliceConfig, check_network

    modes = _modes(compression)
    if not profile_only and not list_cuts:
        if bandwidth_mbps is None or rtt_ms is None:
            if parts is None:
                raise BadInputError("Give the network: --bandwidth-mbps B --rtt-ms R (or --parts K, --profile-only, "
                                    "--list-cuts).")
        else:
            check_network(bandwidth_mbps, rtt_ms, server_speedup)
    limits = _limits(device_memory_mb, parts)
    if server_overhead_ms is not None and not server_overhead_ms >= 0:
        raise BadInputError(f"--server-overhead-ms must be 0 or more milliseconds; got {server_overhead_ms}.")
    if server_profile is not None and not server_profile.is_file():
        raise ModelNotFoundError(f"--server-profile {server_profile} does not exist; write it on the server with "
                                 "`compactai slice MODEL --profile-only -o DIR` (DIR/profile.json).")
    if output is None and not list_cuts:
        raise BadInputError("Give an output directory: -o OUT.")
    config = SliceConfig(max_tensors=max_tensors, max_cuts=max_cuts, threads=threads, rounds=rounds,
                         memory=memory or device_memory_mb is not None)
    with out.progress("Slicing") as say:
        handle, task, info = resolve_model(path, example, progress=lambda e, n, acc: say(f"training example, epoch {e}/{n}"),
                                           hf_task=hf_task)
        samples = _samples(handle, task, data)
        work = Path(tempfile.mkdtemp(prefix="compactai-slice-"))
        try:
            model_path = _as_onnx(handle, work / "model.onnx")
            if list_cuts:
                _print_cuts(out, model_path, max_tensors)
                return
            if parts is not None:
                from compactai.cli._slice_run import run_partition

                assert output is not None
                run_partition(out, model_path, samples, parts, limits, config, output, work, say, info)
                return
            from compactai.techniques.slice.placement import profile_cuts

            cuts = None
            if cut is not None:
                from compactai.techniques.slice.graph import Graph

                cuts = [Graph.load(model_path).validate_cut([c.strip() for c in cut.split(",") if c.strip()])]
            profiles = profile_cuts(model_path, samples, config, work / "cuts", progress=say, cuts=cuts)
            assert output is not None
            from compactai.cli._slice_run import measure_server_overhead, write_placement, write_profile

            if profile_only:
                overhead = server_overhead_ms if server_overhead_ms is not None else \
                    measure_server_overhead(work, say)
                write_profile(out, profiles, output, info, overhead)
                return
            assert bandwidth_mbps is not None and rtt_ms is not None
            measured = json.loads(server_profile.read_text()) if server_profile else {}
            server = measured.get("tail_ms") if server_profile else None
            stated = server_overhead_ms if server_overhead_ms is not None else measured.get("server_overhead_ms")
            overhead = float(stated) if stated is not None else measure_server_overhead(work, say)
            write_placement(out, profiles, model_path, samples, output, info, bandwidth_mbps=bandwidth_mbps,
                            rtt_ms=rtt_ms, server_speedup=server_speedup, limit=limits[0] if limits else None,
                            modes=modes, server=server, config=config, server_overhead_ms=overhead)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _modes(compression: str) -> tuple[str, ...]:
    from compactai.techniques.slice import COMPRESSIONS

    modes = COMPRESSIONS if compression == "all" else tuple(m.strip() for m in compression.split(",") if m.strip())
    for mode in modes:
        if mode not in COMPRESSIONS:
            raise BadInputError(f"Unknown --compression {mode!r}; choose from {', '.join(COMPRESSIONS)} or all.")
    return modes


def _limits(device_memory_mb: str | None, parts: int | None) -> list[float]:
    if device_memory_mb is None:
        if parts is not None:
            raise BadInputError("--parts K needs --device-memory-mb M1,...,MK (one limit per part).")
        return []
    try:
        limits = [float(v) for v in device_memory_mb.split(",")]
    except ValueError as exc:
        raise BadInputError(f"--device-memory-mb must be numbers in MB, comma-separated; got {device_memory_mb!r}.") from exc
    if any(not v > 0 for v in limits):
        raise BadInputError(f"--device-memory-mb limits must be positive; got {device_memory_mb!r}.")
    if parts is not None:
        if parts < 2:
            raise BadInputError(f"--parts must be 2 or more; got {parts}.")
        if len(limits) != parts:
            raise BadInputError(f"--parts {parts} needs {parts} memory limits; --device-memory-mb gave {len(limits)}.")
    elif len(limits) != 1:
        raise BadInputError("Without --parts, --device-memory-mb takes one limit (the device's).")
    return limits


def _samples(handle: Any, task: Any, data: Path | None) -> dict[str, np.ndarray]:
    """Model inputs by name: from --data, the example task's evaluation split, or the handle's example."""
    if data is not None:
        if not data.exists():
            raise ModelNotFoundError(f"--data {data} does not exist.")
        with np.load(data, allow_pickle=False) as loaded:
            arrays = {k: loaded[k] for k in loaded.files}
        missing = [n for n in handle.input_names if n not in arrays]
        if missing and len(handle.input_names) == 1 and len(arrays) >= 1 and "x" in arrays:
            arrays = {handle.input_names[0]: arrays["x"]}
        elif missing:
            raise BadInputError(f"--data {data} lacks input(s) {missing}; it holds {sorted(arrays)}.")
        return {n: arrays[n] for n in handle.input_names}
    if task is not None:
        from compactai.tasks import trim_padding

        split = task.splits[task.eval_split]
        return trim_padding({k: v[:64] for k, v in split.inputs.items()})
    return dict(handle.example_inputs)


def _as_onnx(handle: Any, path: Path) -> Path:
    import onnx

    if handle.framework == "onnx":
        onnx.save(onnx.load(str(handle.path)), str(path))
        return path
    return Path(handle.to_onnx(path).path)


def _print_cuts(out: Output, model_path: Path, max_tensors: int) -> None:
    from compactai.techniques.slice.graph import Graph

    cuts = Graph.load(model_path).enumerate_cuts(max_tensors)
    out.console.print(table(f"Valid cuts of at most {max_tensors} tensors", ["#", "after node", "tensors"],
                            [[i, c.position, c.label] for i, c in enumerate(cuts)]))
    out.emit({"cuts": [c.to_dict() for c in cuts]})

