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


def int8_kernels_saturate() -> bool:
    """True on an x86 CPU without VNNI: ONNX Runtime's u8s8 int8 kernels then use AVX2's
    VPMADDUBSW, whose int16 sums saturate with full 8-bit weights. On this project's AVX2-only
    CI machine that took static int8 of the digits CNN from 0.994 to 0.747 accuracy; 7-bit weights
    (reduce_range) kept 0.994 (tests/techniques/test_quantize.py)."""
    info = cpu_info()
    if info["machine"] not in ("x86_64", "AMD64", "i386", "i686"):
        return False
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(info["flags"])


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
