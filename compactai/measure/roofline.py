"""Roofline context: what fraction of this CPU's peak fp32 / int8 arithmetic a model reaches.

Peak = MACs per cycle per core (from the SIMD features the CPU reports) x cores used x clock.
The per-cycle figures assume two vector FMA (or dot-product) ports per core, as on current
x86 server cores; they are the textbook upper bounds, not what any kernel reaches. The formula
and every input are returned with the figure so a reader can redo it for another CPU.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from compactai.measure.environment import cpu_info

# (flag that must be present, MACs per cycle per core, how): the first match wins
FP32_MACS_PER_CYCLE = (
    ("avx512f", 32, "2 ports x 16 fp32 lanes (AVX-512 FMA)"),
    ("fma", 16, "2 ports x 8 fp32 lanes (AVX2 FMA)"),
    ("avx", 8, "8 fp32 lanes, separate multiply and add (AVX)"),
    ("", 4, "4 fp32 lanes (SSE)"),
)
INT8_MACS_PER_CYCLE = (
    ("avx512_vnni", 128, "2 ports x 64 int8 MACs (AVX-512 VNNI VPDPBUSD)"),
    ("avx_vnni", 64, "2 ports x 32 int8 MACs (AVX-VNNI VPDPBUSD)"),
    ("avx2", 32, "32 int8 MACs per VPMADDUBSW+VPMADDWD+VPADDD sequence (AVX2, no VNNI)"),
    ("", 8, "8 int8 MACs (SSE)"),
)


def clock_ghz() -> tuple[float | None, str]:
    """The core clock in GHz and where it came from: cpufreq's maximum, else /proc/cpuinfo's
    current MHz (a VM often shows only that), else the nominal GHz in the model name."""
    cpufreq = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(cpufreq.read_text()) / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    mhz = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, flags=re.M)
    if mhz:
        return max(float(m) for m in mhz) / 1e3, "/proc/cpuinfo cpu MHz"
    nominal = re.search(r"@\s*([\d.]+)\s*GHz", str(cpu_info()["model"]))
    if nominal:
        return float(nominal.group(1)), "model name"
    return None, "unknown"


def _per_cycle(table: tuple[tuple[str, int, str], ...], flags: set[str]) -> tuple[int, str]:
    for flag, macs, how in table:
        if not flag or flag in flags:
            return macs, how
    raise AssertionError("the tables end with a catch-all row")


def _all_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set(cpu_info()["flags"])


def peak(threads: int, flags: set[str] | None = None, ghz: float | None = None) -> dict[str, Any]:
    """Peak fp32 and int8 MAC/s with ``threads`` cores busy (capped at the logical CPUs)."""
    flags = _all_flags() if flags is None else flags
    source = "given"
    if ghz is None:
        ghz, source = clock_ghz()
    cores = max(1, min(threads, cpu_info()["logical_cpus"] or threads))
    fp32, fp32_how = _per_cycle(FP32_MACS_PER_CYCLE, flags)
    int8, int8_how = _per_cycle(INT8_MACS_PER_CYCLE, flags)
    result: dict[str, Any] = {"cores": cores, "clock_ghz": ghz, "clock_source": source,
                              "fp32_macs_per_cycle": fp32, "fp32_basis": fp32_how,
                              "int8_macs_per_cycle": int8, "int8_basis": int8_how,
                              "formula": "peak MAC/s = MACs per cycle per core x cores x clock (Hz)"}
    result["fp32_peak_gmacs"] = fp32 * cores * ghz if ghz else None
    result["int8_peak_gmacs"] = int8 * cores * ghz if ghz else None
    return result


def roofline(macs_per_item: int | None, items_per_s: float | None, threads: int, int8: bool,
             flags: set[str] | None = None, ghz: float | None = None) -> dict[str, Any]:
    """Achieved GMAC/s (MACs per item x items per second) and its fraction of the fp32 or int8
    peak, with the formula. ``None`` figures when MACs or throughput are unknown."""
    top = peak(threads, flags, ghz)
    achieved = macs_per_item * items_per_s / 1e9 if macs_per_item and items_per_s else None
    key = "int8_peak_gmacs" if int8 else "fp32_peak_gmacs"
    fraction = achieved / top[key] if achieved is not None and top[key] else None
    caveat = None
    if fraction is not None and fraction > 1:
        # more than the textbook bound means an input is low: in a VM, the clock /proc/cpuinfo
        # shows is often the base clock while the cores run at their boost clock
        implied = top["clock_ghz"] * fraction
        caveat = (f"above the peak computed from {top['clock_ghz']:.2f} GHz ({top['clock_source']}): this CPU ran "
                  f"at {implied:.2f} GHz or more (a boost clock the reading does not show), so read the fraction as "
                  f"'at the peak'")
    return {**top, "precision": "int8" if int8 else "fp32", "achieved_gmacs": achieved, "fraction_of_peak": fraction,
            "caveat": caveat,
            "achieved_formula": "achieved MAC/s = MACs per item x items per second (offline throughput)"}


__all__ = ["FP32_MACS_PER_CYCLE", "INT8_MACS_PER_CYCLE", "clock_ghz", "peak", "roofline"]
