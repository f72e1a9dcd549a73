"""The contenders of `make bench-peers`: each builder returns a runner (``run(feeds) -> outputs``)
plus facts, or raises; the driver (peers.py) records the error in the table instead."""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compactai.measure import make_runner
from compactai.measure.environment import cpu_info
from compactai.models.handle import ModelHandle


@dataclass
class Contender:
    """One peer: how it runs, what it is, and its artifact (for size and peak memory)."""

    name: str
    runtime: str
    runner: Any = None
    handle: ModelHandle | None = None  # ONNX or torch handle (compactai.measure can probe its memory)
    files: list[Path] = field(default_factory=list)  # on-disk artifact, for size
    ours: bool = False
    error: str | None = None
    notes: list[str] = field(default_factory=list)


class OpenVINORunner:
    """OpenVINO CPU plugin with the thread count set, latency hint (one request at a time)."""

    runtime = "openvino"

    def __init__(self, model: Any, threads: int) -> None:
        import openvino as ov

        self.threads = threads
        self.compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                               "PERFORMANCE_HINT": "LATENCY"})
        self.names = [port.any_name for port in self.compiled.inputs]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.compiled({n: feeds[n] for n in self.names})
        return [np.asarray(result[port]) for port in self.compiled.outputs]


def onnx_files(path: Path) -> list[Path]:
    return [p for p in (path, Path(str(path) + ".data")) if p.exists()]


def ort(name: str, handle: ModelHandle, threads: int, ours: bool = False) -> Contender:
    return Contender(name, "onnxruntime", make_runner(handle, "onnxruntime", threads), handle,
                     onnx_files(Path(handle.path)) if handle.path else [], ours=ours)


def torch_eager(handle: ModelHandle, threads: int) -> Contender:
    return Contender("PyTorch fp32 eager", "torch", make_runner(handle, "torch", threads), handle)


def ort_dynamic(float_onnx: ModelHandle, work: Path, threads: int, per_channel: bool) -> Contender:
    from onnxruntime.quantization import quantize_dynamic

    path = work / f"ort_dynamic{'_per_channel' if per_channel else ''}.onnx"
    quantize_dynamic(str(float_onnx.path), str(path), per_channel=per_channel)
    label = "ORT quantize_dynamic " + ("per-channel" if per_channel else "default")
    return ort(label, float_onnx.as_onnx(path), threads)


def optimum_quantizer(float_onnx: ModelHandle, work: Path, threads: int) -> Contender:
    """Hugging Face Optimum's ORTQuantizer with the dynamic preset that fits this CPU."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    flags = set(cpu_info()["flags"])
    preset = "avx512_vnni" if "avx512_vnni" in flags else ("avx512" if "avx512f" in flags else "avx2")
    source = work / "optimum-src"
    source.mkdir(parents=True, exist_ok=True)
    target = source / "model.onnx"
    if not target.exists():
        target.write_bytes(Path(float_onnx.path).read_bytes())
    quantizer = ORTQuantizer.from_pretrained(source, file_name="model.onnx")
    config = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=False)
    out = work / "optimum"
    quantizer.quantize(save_dir=out, quantization_config=config)
    path = next(out.glob("*.onnx"))
    contender = ort(f"Optimum ORTQuantizer ({preset}, dynamic)", float_onnx.as_onnx(path), threads)
    contender.notes.append(f"preset AutoQuantizationConfig.{preset} chosen from the CPU flags")
    return contender


def openvino_fp32(float_onnx: ModelHandle, work: Path, threads: int) -> Contender:
    import openvino as ov

    model = ov.convert_model(str(float_onnx.path))
    xml = work / "openvino_fp32.xml"
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return Contender("OpenVINO fp32", "openvino", OpenVINORunner(model, threads), None, [xml, xml.with_suffix(".bin")])


def openvino_int8(float_onnx: ModelHandle, calibration: list[dict[str, np.ndarray]], work: Path, threads: int,
                  transformer: bool) -> Contender:
    """OpenVINO int8 from NNCF post-training quantization on the calibration split."""
    import nncf
    import openvino as ov

    model = ov.convert_model(str(float_onnx.path))
    kwargs: dict[str, Any] = {"subset_size": len(calibration)}
    if transformer:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
    quantized = nncf.quantize(model, nncf.Dataset(calibration), **kwargs)
    xml = work / "openvino_int8.xml"
    ov.save_model(quantized, str(xml))
    contender = Contender("OpenVINO int8 (NNCF PTQ)", "openvino", OpenVINORunner(quantized, threads), None,
                          [xml, xml.with_suffix(".bin")])
    contender.notes.append(f"nncf.quantize on {len(calibration)} calibration samples"
                           + (", model_type=TRANSFORMER" if transformer else ""))
    return contender


def torch_pruning_magnitude(handle: ModelHandle, task: Any, target_macs_ratio: float, work: Path, threads: int,
                            epochs: int = 3) -> Contender:
    """Torch-Pruning's MagnitudePruner (L2) at the MAC reduction of compactai's model, found by
    bisection on the pruning ratio, then fine-tuned on the train split for ``epochs`` epochs
    (the same kind of recovery compactai's pruning gets), exported to ONNX Runtime."""
    import torch
    import torch_pruning as tp

    from compactai.models.load import load_model

    module = handle.module
    assert module is not None
    example = torch.from_numpy(handle.example_inputs[handle.input_names[0]][:1])
    base_macs, _ = tp.utils.count_ops_and_params(module, example)

    def pruned(ratio: float) -> tuple[Any, float]:
        model = copy.deepcopy(module)
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
        pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=ratio, ignored_layers=last)
        pruner.step()
        macs, _ = tp.utils.count_ops_and_params(model, example)
        return model, macs / base_macs

    low, high = 0.0, 0.95
    model, ratio_macs = module, 1.0
    for _ in range(10):
        middle = (low + high) / 2
        model, ratio_macs = pruned(middle)
        print(f"    torch-pruning ratio {middle:.3f}: MACs {ratio_macs:.3f}x", flush=True)
        if abs(ratio_macs - target_macs_ratio) < 0.02:
            break
        low, high = (middle, high) if ratio_macs > target_macs_ratio else (low, middle)
    model.train()
    torch.set_num_threads(threads)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train = task.split("train")
    images = torch.from_numpy(train.inputs[handle.input_names[0]])
    labels = torch.from_numpy(train.labels.astype(np.int64))
    generator = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        print(f"    torch-pruning fine-tune epoch {epoch + 1}/{epochs}", flush=True)
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 64):
            index = order[start:start + 64]
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images[index]), labels[index]).backward()
            optimizer.step()
    model.eval()
    pruned_handle = load_model(model, {handle.input_names[0]: example}, name="tp-magnitude",
                               output_names=handle.output_names)
    onnx_handle = pruned_handle.to_onnx(work / "torch_pruning.onnx")
    contender = ort("Torch-Pruning magnitude + fine-tune", onnx_handle, threads)
    contender.notes.append(f"MACs {ratio_macs:.3f}x of the original (target {target_macs_ratio:.3f}x), "
                           f"{epochs} epochs Adam fine-tuning; run on ONNX Runtime")
    return contender


def compactai_digits(work: Path, minutes: float) -> Path:
    """compactai's chosen digits model: `compactai optimize --example digits` (the `make demo`
    budget) in a subprocess; returns its model.onnx (raises with its last message when none)."""
    out = work / "optimize"
    if not (out / "model.onnx").exists():
        done = subprocess.run([sys.executable, "-m", "compactai.cli", "optimize", "--example", "digits",
                               "--max-minutes", str(minutes), "-o", str(out), "--json"], capture_output=True,
                              text=True, timeout=3600, check=False)
        if not (out / "model.onnx").exists():
            last = [ln for ln in done.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
            raise RuntimeError(f"compactai optimize --max-minutes {minutes:g} wrote no model (exit {done.returncode}: "
                               f"{last[0][:200]})")
    return out / "model.onnx"
