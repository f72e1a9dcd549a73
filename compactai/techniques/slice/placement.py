"""Placement by measurement: time every cut's head and tail on ONNX Runtime, measure the tensor
that crosses the network (raw, fp16, int8) and what compressing it costs in fidelity, then pick the
cut with the lowest end-to-end latency for a stated network and device memory.

Cost model (per query, batch 1)::

    end-to-end = head_ms (device) + request_bytes * 8 / bandwidth + RTT + server_overhead_ms
                 + tail_ms / server_speedup

The upload is what the bandwidth limits (``request_bytes``: the tensor plus the protocol's JSON
header, as the split runner sends it); the response (the model's output) is assumed small and rides
inside the RTT. ``server_overhead_ms`` is what one request costs besides the tail itself (HTTP
parsing, protocol decoding, the client's encoding): measured with a real ``/infer`` of a
one-element model against a real server, not assumed. all-local (no transfer) and all-remote (the
raw input is sent) are candidates.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from compactai.errors import BadInputError
from compactai.measure import make_runner, measure_latency, turn_order
from compactai.measure.memory import measure_peak_memory
from compactai.models.load import load_onnx
from compactai.techniques.slice.graph import COMPRESSIONS, LOCAL, REMOTE, Cut, Graph, compress, observe
from compactai.techniques.slice.runner import encode_request


@dataclass
class SliceConfig:
    """How cuts are enumerated and measured."""

    max_tensors: int = 2  # cuts of at most this many tensors
    max_cuts: int = 12  # split cuts kept for measurement, evenly spaced along the graph
    compressions: tuple[str, ...] = COMPRESSIONS
    threads: int | None = None
    rounds: int = 3  # interleaved timing rounds (load that comes and goes hits every part alike)
    min_queries: int = 30
    min_seconds: float = 0.2
    memory: bool = False  # peak memory of every head, each in a subprocess
    samples: int = 64  # rows used for the fidelity check


@dataclass
class Part:
    """One head or tail model on disk with its wire names."""

    path: Path | None
    inputs: list[str]
    outputs: list[str]


@dataclass
class CutProfile:
    """Everything measured for one cut."""

    cut: Cut
    head_ms: dict[str, float]  # per compression; 0 when nothing runs on the device
    tail_ms: dict[str, float]  # per compression, on this machine; 0 when nothing runs remotely
    tensor_bytes: dict[str, int]  # tensor bytes crossing the network per query, per compression
    fidelity: dict[str, dict[str, float]]  # per compression: outputs vs the unsplit model
    head_memory_mb: float | None = None  # peak RSS minus the runtime's RSS before loading
    head_peak_mb: float | None = None
    request_bytes: dict[str, int] = field(default_factory=dict)  # the whole request body, header included
    parts: dict[str, tuple[Part, Part]] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("cut", "parts")}
        return {"cut": self.cut.to_dict(), **data}


def check_network(bandwidth_mbps: float, rtt_ms: float, server_speedup: float) -> None:
    """BadInputError for a bandwidth or speed-up that is not positive, or a negative RTT."""
    if not bandwidth_mbps > 0 or math.isinf(bandwidth_mbps):
        raise BadInputError(f"--bandwidth-mbps must be a positive number of megabits per second; got {bandwidth_mbps}.")
    if not rtt_ms > 0 or math.isinf(rtt_ms):
        raise BadInputError(f"--rtt-ms must be a positive number of milliseconds; got {rtt_ms}.")
    if not server_speedup > 0:
        raise BadInputError(f"--server-speedup must be positive (2 = the server runs the tail twice as fast "
                            f"as this machine); got {server_speedup}.")


def select_cuts(cuts: list[Cut], max_cuts: int) -> list[Cut]:
    """all-remote, up to ``max_cuts`` split cuts evenly spaced along the graph, all-local."""
    splits = [c for c in cuts if c.kind not in (LOCAL, REMOTE)]
    if len(splits) > max_cuts:
        picks = sorted({round(i * (len(splits) - 1) / max(max_cuts - 1, 1)) for i in range(max_cuts)})
        splits = [splits[i] for i in picks]
    return [c for c in cuts if c.kind == REMOTE] + splits + [c for c in cuts if c.kind == LOCAL]


def write_parts(graph: Graph, cut: Cut, observed: dict[str, np.ndarray], directory: Path, mode: str,
                float_tensors: set[str]) -> tuple[Part, Part]:
    """Head and tail of ``cut`` (compressed as ``mode``) written to ``directory``; a side with
    nothing to run (all-local's tail, all-remote's raw head) has path None."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = list(cut.tensors)
    if cut.kind == LOCAL:
        head = graph.extract(graph.inputs, graph.outputs, "head", observed)
        onnx.save(head, str(directory / "head.onnx"))
        return Part(directory / "head.onnx", graph.inputs, graph.outputs), Part(None, graph.outputs, graph.outputs)
    head = graph.extract(graph.inputs, tensors, "head", observed)
    tail = graph.extract(tensors, graph.outputs, "tail", observed)
    head, tail, wire = compress(head, tail, cut, mode, float_tensors)
    sent = [o.name for o in head.graph.output]
    head_path: Path | None = directory / "head.onnx"
    if (cut.kind == REMOTE and mode == "raw") or not len(head.graph.node):
        head_path = None  # nothing to compute on the device: the inputs go as they are
    else:
        onnx.save(head, str(directory / "head.onnx"))
    onnx.save(tail, str(directory / "tail.onnx"))
    del wire
    return Part(head_path, graph.inputs, sent), Part(directory / "tail.onnx", sent, graph.outputs)


def profile_cuts(model_path: Path, samples: dict[str, np.ndarray], config: SliceConfig, workdir: Path,
                 progress: Callable[[str], None] = lambda message: None, cuts: list[Cut] | None = None
                 ) -> list[CutProfile]:
    """Measure every cut (the enumerated ones, or ``cuts``): head and tail latency, bytes sent, fidelity."""
    for mode in config.compressions:
        if mode not in COMPRESSIONS:
            raise BadInputError(f"Unknown compression {mode!r}; choose from {', '.join(COMPRESSIONS)}.")
    graph = Graph.load(model_path)
    if cuts is None:
        cuts = select_cuts(graph.enumerate_cuts(config.max_tensors), config.max_cuts)
    single = {k: v[:1] for k, v in samples.items() if k in graph.inputs}
    batch = {k: v[:config.samples] for k, v in samples.items() if k in graph.inputs}
    names = sorted({t for c in cuts for t in c.tensors} - set(graph.inputs))
    observed = {**observe(graph.model, single, names), **single}
    float_tensors = {n for n, v in observed.items() if v.dtype == np.float32}
    reference = _run_model(Part(model_path, graph.inputs, graph.outputs), batch, config.threads)
    profiles: list[CutProfile] = []
    for index, cut in enumerate(cuts):
        progress(f"extracting cut {index + 1}/{len(cuts)}: {cut.label[:60]}")
        modes = ("raw",) if cut.kind == LOCAL else tuple(m for m in config.compressions)
        if "raw" not in modes:
            modes = ("raw", *modes)
        profile = CutProfile(cut, {}, {}, {}, {})
        for mode in modes:
            head, tail = write_parts(graph, cut, observed, workdir / f"cut{index:02d}" / mode, mode, float_tensors)
            profile.parts[mode] = (head, tail)
            middle = _run_model(head, batch, config.threads) if head.path else batch
            sent_one = {k: v[:1] if v.ndim else v for k, v in middle.items()}
            profile.tensor_bytes[mode] = 0 if cut.kind == LOCAL else int(sum(v.nbytes for v in sent_one.values()))
            profile.request_bytes[mode] = 0 if cut.kind == LOCAL else len(encode_request(sent_one)[0])
            outputs = middle if tail.path is None else _run_model(tail, middle, config.threads)
            profile.fidelity[mode] = fidelity(reference, outputs)
        profiles.append(profile)
    _time_parts(profiles, single, config, progress)
    if config.memory:
        for index, profile in enumerate(profiles):
            head = profile.parts["raw"][0]
            if head.path is None:
                profile.head_memory_mb = profile.head_peak_mb = 0.0
                continue
            progress(f"peak memory of head {index + 1}/{len(profiles)} (subprocess)")
            handle = load_onnx(head.path)
            handle.example_inputs = {k: v for k, v in single.items() if k in handle.input_names}
            stats = measure_peak_memory(handle, "onnxruntime", config.threads or 1)
            if stats is not None:
                profile.head_memory_mb, profile.head_peak_mb = stats.model_mb, stats.peak_mb
    return profiles


def _run_model(part: Part, feeds: dict[str, np.ndarray], threads: int | None) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(part.path), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def fidelity(reference: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """How far the split outputs are from the unsplit model's: max abs diff, and for class scores
    (2-D outputs) the share of rows with the same arg-max, else the mean cosine similarity."""
    diff = max(float(np.max(np.abs(outputs[k].astype(np.float64) - v))) for k, v in reference.items())
    first = next(iter(reference))
    ref, got = reference[first].astype(np.float64), outputs[first].astype(np.float64)
    result = {"max_abs_diff": diff}
    if ref.ndim == 2 and ref.shape[1] > 1:
        result["argmax_agreement"] = float(np.mean(ref.argmax(1) == got.argmax(1)))
    else:
        a, b = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        result["cosine_mean"] = float(cosine.mean())
    return result


def _time_parts(profiles: list[CutProfile], single: dict[str, np.ndarray], config: SliceConfig,
                progress: Callable[[str], None]) -> None:
    """Batch-1 latency of every head and tail, interleaved over rounds; the median over rounds."""
    jobs: list[tuple[CutProfile, str, str, Any, dict[str, np.ndarray]]] = []
    for profile in profiles:
        for mode, (head, tail) in profile.parts.items():
            head_feeds = single
            if head.path is not None:
                runner = _runner(head.path, single, config.threads)
                jobs.append((profile, mode, "head", runner, runner.handle.example_inputs))
                head_feeds = _run_model(head, single, config.threads)
            else:
                profile.head_ms[mode] = 0.0
            if tail.path is not None:
                runner = _runner(tail.path, head_feeds, config.threads)
                jobs.append((profile, mode, "tail", runner, runner.handle.example_inputs))
            else:
                profile.tail_ms[mode] = 0.0
    timings: list[list[float]] = [[] for _ in jobs]
    for round_number in range(config.rounds):
        progress(f"timing {len(jobs)} heads and tails, round {round_number + 1}/{config.rounds}")
        for index in turn_order(len(jobs), round_number):
            stats = measure_latency(jobs[index][3], jobs[index][4], min_queries=config.min_queries,
                                    min_seconds=config.min_seconds, warmup=5)
            timings[index].append(stats.p50_ms)
    for (profile, mode, side, _, _), values in zip(jobs, timings):
        (profile.head_ms if side == "head" else profile.tail_ms)[mode] = statistics.median(values)


def _runner(path: Path, feeds: dict[str, np.ndarray], threads: int | None) -> Any:
    handle = load_onnx(path)
    handle.example_inputs = {k: v for k, v in feeds.items() if k in handle.input_names}
    return make_runner(handle, "onnxruntime", threads)


def end_to_end_ms(profile: CutProfile, mode: str, bandwidth_mbps: float, rtt_ms: float, server_speedup: float,
                  server_tail_ms: float | None = None, server_overhead_ms: float = 0.0) -> dict[str, float]:
    """The cost model's figures for one cut and compression on one network: ``transfer_ms`` is the
    upload plus the RTT, ``overhead_ms`` the per-request cost of the server and protocol."""
    tail = profile.tail_ms[mode] / server_speedup if server_tail_ms is None else server_tail_ms
    if profile.cut.kind == LOCAL:
        transfer = overhead = tail = 0.0
    else:
        sent = profile.request_bytes.get(mode) or profile.tensor_bytes[mode]  # profiles from before request_bytes
        transfer = sent * 8 / (bandwidth_mbps * 1e6) * 1e3 + rtt_ms
        overhead = server_overhead_ms
    head = profile.head_ms[mode]
    return {"head_ms": head, "transfer_ms": transfer, "overhead_ms": overhead, "tail_ms": tail,
            "end_to_end_ms": head + transfer + overhead + tail}


def choose(profiles: list[CutProfile], bandwidth_mbps: float, rtt_ms: float, server_speedup: float,
           device_memory_mb: float | None = None, modes: tuple[str, ...] = ("raw",),
           server_profile: dict[str, float] | None = None, server_overhead_ms: float = 0.0) -> dict[str, Any]:
    """The (cut, compression) with the lowest end-to-end latency whose head fits the device memory."""
    best: dict[str, Any] | None = None
    for index, profile in enumerate(profiles):
        if device_memory_mb is not None and (profile.head_memory_mb or 0.0) > device_memory_mb:
            continue
        for mode in modes:
            if mode not in profile.tail_ms:
                continue
            server = None if server_profile is None else server_profile.get(profile_key(profile.cut, mode))
            figures = end_to_end_ms(profile, mode, bandwidth_mbps, rtt_ms, server_speedup, server, server_overhead_ms)
            if best is None or figures["end_to_end_ms"] < best["end_to_end_ms"]:
                best = {"index": index, "cut": profile.cut.to_dict(), "compression": mode, **figures}
    if best is None:
        smallest = min((p.head_memory_mb or 0.0) for p in profiles)
        raise BadInputError(f"No cut fits --device-memory-mb {device_memory_mb}: the smallest head needs "
                            f"{smallest:.1f} MB; raise the limit.")
    return best


def profile_key(cut: Cut, mode: str) -> str:
    """How a server profile names the tail of one cut and compression."""
    return f"{cut.kind}|{'+'.join(cut.tensors)}|{mode}"


def bandwidth_sweep(bandwidth_mbps: float) -> list[float]:
    """The stated bandwidth and two others a decade either side (for the table and the note)."""
    return [bandwidth_mbps / 10, bandwidth_mbps, bandwidth_mbps * 10]


def placement_report(profiles: list[CutProfile], *, bandwidth_mbps: float, rtt_ms: float, server_speedup: float,
                     device_memory_mb: float | None, modes: tuple[str, ...],
                     server_profile: dict[str, float] | None = None, server_overhead_ms: float = 0.0
                     ) -> dict[str, Any]:
    """The table (every cut at three bandwidths), the choice at the stated bandwidth and at the
    others (so the note shows how it moves), and the assumptions, as plain data."""
    rows = []
    sweep = bandwidth_sweep(bandwidth_mbps)
    for profile in profiles:
        row = profile.to_dict()
        row["end_to_end_ms"] = {
            mode: {f"{bw:g}": end_to_end_ms(profile, mode, bw, rtt_ms, server_speedup,
                                             None if server_profile is None
                                             else server_profile.get(profile_key(profile.cut, mode)),
                                             server_overhead_ms)["end_to_end_ms"]
                   for bw in sweep} for mode in profile.tail_ms}
        row["fits_memory"] = device_memory_mb is None or (profile.head_memory_mb or 0.0) <= device_memory_mb
        rows.append(row)
    choice = choose(profiles, bandwidth_mbps, rtt_ms, server_speedup, device_memory_mb, modes, server_profile,
                    server_overhead_ms)
    by_bandwidth = {f"{bw:g}": choose(profiles, bw, rtt_ms, server_speedup, device_memory_mb, modes, server_profile,
                                      server_overhead_ms) for bw in sweep}
    return {
        "assumptions": {"bandwidth_mbps": bandwidth_mbps, "rtt_ms": rtt_ms, "server_speedup": server_speedup,
                        "device_memory_mb": device_memory_mb, "candidate_compressions": list(modes),
                        "server_overhead_ms": server_overhead_ms,
                        "tail_latency": "server profile" if server_profile else "this machine / server_speedup",
                        "cost_model": "head_ms + request_bytes*8/bandwidth + rtt_ms + server_overhead_ms + "
                                      "tail_ms/server_speedup; the response rides inside the RTT",
                        "bandwidths_mbps": sweep},
        "cuts": rows,
        "choice": choice,
        "choice_by_bandwidth": {bw: {"cut": c["cut"]["label"], "compression": c["compression"],
                                     "end_to_end_ms": c["end_to_end_ms"]} for bw, c in by_bandwidth.items()},
    }
