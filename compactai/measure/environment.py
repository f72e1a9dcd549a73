"""What machine and software a measurement ran on, for reproducibility."""

from __future__ import annotations

import platform
from functools import lru_cache
from importlib import metadata
from typing import Any

INTERESTING_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16",
                     "amx_bf16", "amx_int8", "avx512_fp16")


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """CPU model name, the SIMD flags that matter for int8/bf16/fp16 kernels, and core count."""
    model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("unknown", "", "x86_64"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import os

    return {
        "model": model,
        "flags": sorted(f for f in INTERESTING_FLAGS if f in flags),
        "logical_cpus": os.cpu_count(),
        "machine": platform.machine(),
    }


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("compactai", "torch", "onnx", "onnxruntime", "numpy", "torch-pruning", "optuna", "transformers"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def environment() -> dict[str, Any]:
    return {"cpu": cpu_info(), "versions": versions(), "platform": platform.platform()}
