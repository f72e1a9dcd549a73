"""The cloud-vs-local decision: measured figures plus stated assumptions -> latency with the
network, capacity, cost, energy, break-even volume, privacy and the update path.

Nothing is fetched live: every price, rate and bandwidth is an input (:data:`ASSUMPTIONS` holds
each one's default, unit and meaning; ``docs/bench.md`` prints the same table). The arithmetic is
in :func:`decide`, one formula per figure, and every formula is returned with its result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from compactai.errors import BadInputError, ParameterError

HOURS_PER_MONTH = 730.0  # 8760 h / 12
SECONDS_PER_DAY = 86_400.0

# name: (default, unit, meaning)
ASSUMPTIONS: dict[str, tuple[float, str, str]] = {
    "requests_per_day": (1_000_000, "requests/day", "inference requests per day, all devices together"),
    "peak_to_mean": (3.0, "ratio", "peak request rate over the daily mean rate"),
    "network_rtt_ms": (40.0, "ms", "round trip from the device to the cloud endpoint"),
    "upload_mbps": (10.0, "Mbit/s", "device upload bandwidth to the cloud"),
    "payload_bytes": (4_096, "bytes", "request payload sent to the cloud (the model's input)"),
    "response_bytes": (2_048, "bytes", "response returned from the cloud (billed as egress)"),
    "cloud_price_per_hour": (0.34, "USD/hour", "price of one cloud inference instance"),
    "cloud_speedup": (1.0, "x this machine", "cloud instance throughput and latency relative to this machine's "
                      "measured figures for the original model (or set cloud_throughput_per_s)"),
    "cloud_throughput_per_s": (0.0, "inferences/s", "stated throughput of one cloud instance; 0 = measured "
                               "original x cloud_speedup"),
    "cloud_utilization": (0.6, "fraction", "average utilization the cloud fleet reaches (autoscaling headroom)"),
    "cloud_instance_watts": (150.0, "W", "power draw of one busy cloud instance (for the energy estimate)"),
    "egress_price_per_gb": (0.09, "USD/GB", "cloud data-egress price"),
    "local_hardware_price": (1_200.0, "USD", "price of one local machine like this one"),
    "local_lifetime_months": (36.0, "months", "months over which the local hardware is written off"),
    "local_power_watts": (65.0, "W", "average power draw of one local machine"),
    "electricity_price_per_kwh": (0.30, "USD/kWh", "electricity price where the local machine runs"),
}


@dataclass
class Assumptions:
    """The inputs of the decision, with :data:`ASSUMPTIONS`' defaults."""

    requests_per_day: float = ASSUMPTIONS["requests_per_day"][0]
    peak_to_mean: float = ASSUMPTIONS["peak_to_mean"][0]
    network_rtt_ms: float = ASSUMPTIONS["network_rtt_ms"][0]
    upload_mbps: float = ASSUMPTIONS["upload_mbps"][0]
    payload_bytes: float = ASSUMPTIONS["payload_bytes"][0]
    response_bytes: float = ASSUMPTIONS["response_bytes"][0]
    cloud_price_per_hour: float = ASSUMPTIONS["cloud_price_per_hour"][0]
    cloud_speedup: float = ASSUMPTIONS["cloud_speedup"][0]
    cloud_throughput_per_s: float = ASSUMPTIONS["cloud_throughput_per_s"][0]
    cloud_utilization: float = ASSUMPTIONS["cloud_utilization"][0]
    cloud_instance_watts: float = ASSUMPTIONS["cloud_instance_watts"][0]
    egress_price_per_gb: float = ASSUMPTIONS["egress_price_per_gb"][0]
    local_hardware_price: float = ASSUMPTIONS["local_hardware_price"][0]
    local_lifetime_months: float = ASSUMPTIONS["local_lifetime_months"][0]
    local_power_watts: float = ASSUMPTIONS["local_power_watts"][0]
    electricity_price_per_kwh: float = ASSUMPTIONS["electricity_price_per_kwh"][0]

    def check(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ParameterError(f"The assumption '{item.name}' must be a number >= 0 "
                                     f"({ASSUMPTIONS[item.name][1]}); got {value!r}.")
        for name in ("upload_mbps", "cloud_speedup", "cloud_utilization", "local_lifetime_months", "peak_to_mean"):
            if getattr(self, name) <= 0:
                raise ParameterError(f"The assumption '{name}' must be positive ({ASSUMPTIONS[name][1]}); "
                                     f"got {getattr(self, name)}.")
        if self.cloud_utilization > 1:
            raise ParameterError(f"The assumption 'cloud_utilization' is a fraction from 0 to 1; got {self.cloud_utilization}.")

    def table(self) -> list[dict[str, Any]]:
        return [{"name": k, "value": getattr(self, k), "unit": unit, "default": default, "meaning": meaning}
                for k, (default, unit, meaning) in ASSUMPTIONS.items()]


def load_assumptions(path: str | Path | None) -> Assumptions:
    """Assumptions from a JSON object file ({name: number}); the keys it leaves out keep their defaults."""
    if path is None:
        return Assumptions()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadInputError(f"Assumptions file not found: {path}.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInputError(f"Cannot read the assumptions file {path} as JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{path} must hold one JSON object of assumption: number pairs.")
    unknown = sorted(set(data) - set(ASSUMPTIONS))
    if unknown:
        raise BadInputError(f"{path}: unknown assumption(s) {', '.join(unknown)}; known: {', '.join(ASSUMPTIONS)}.")
    assumptions = Assumptions(**data)
    assumptions.check()
    return assumptions


def figures_of(source: dict[str, Any], which: str) -> dict[str, Any]:
    """Latency, throughput, energy, size and quality of the ``which`` model ("original" or
    "compressed") of a results.json / bundle manifest (baseline / measurements on ONNX Runtime)
    or of a ``compactai bench`` result."""
    if "scenarios" in source:  # compactai bench
        single = source["scenarios"].get("single-stream") or {}
        offline = source["scenarios"].get("offline") or {}
        if not single or not offline:
            raise BadInputError("The bench results need the single-stream and offline scenarios "
                                "(run compactai bench with --scenario all).")
        quality = source.get("quality") or {}
        return {"latency_p50_ms": single["p50_ms"], "latency_p90_ms": single["p90_ms"],
                "throughput_items_per_s": offline["throughput_samples_per_s"], "energy_mj": single.get("energy_mj"),
                "energy_method": single.get("energy_method"), "size_mb": source.get("size_mb"),
                "quality": quality.get("value"), "name": source["model"]["name"]}
    section = source.get("baseline" if which == "original" else "measurements") or {}
    measured = section.get("onnxruntime") if isinstance(section, dict) else None
    if not measured:
        raise BadInputError(f"These results hold no ONNX Runtime figures for the {which} model; pass a results.json "
                            "of a compactai output directory, a bundle built from one, or `compactai bench -o` JSON.")
    quality = measured.get("quality") or {}
    return {key: measured.get(key) for key in ("latency_p50_ms", "latency_p90_ms", "throughput_items_per_s",
                                                 "energy_mj", "energy_method", "size_mb")} | {
        "quality": quality.get("value"), "name": _name(source)}


def _name(source: dict[str, Any]) -> str | None:
    """results.json names its model under "model"; a bundle manifest has "name" ("model" is the file)."""
    model = source.get("model")
    return model.get("name") if isinstance(model, dict) else source.get("name")


def decide(original: dict[str, Any], compressed: dict[str, Any], assumptions: Assumptions) -> dict[str, Any]:
    """Cloud (the original model on cloud instances) vs local (the original and the compressed model
    on machines like this one): every figure with the formula that produced it."""
    a = assumptions
    a.check()
    per_month = a.requests_per_day * 365 / 12
    peak_qps = a.requests_per_day / SECONDS_PER_DAY * a.peak_to_mean
    upload_ms = a.payload_bytes * 8 / (a.upload_mbps * 1e6) * 1e3
    cloud_rate = a.cloud_throughput_per_s or original["throughput_items_per_s"] * a.cloud_speedup
    cloud_compute_ms = original["latency_p90_ms"] / a.cloud_speedup
    egress_per_request = a.response_bytes / 1e9 * a.egress_price_per_gb
    cloud_instances = max(1, math.ceil(peak_qps / (cloud_rate * a.cloud_utilization)))
    cloud_month = cloud_instances * a.cloud_price_per_hour * HOURS_PER_MONTH + per_month * egress_per_request
    cloud_per_request = a.cloud_price_per_hour / (cloud_rate * a.cloud_utilization * 3600) + egress_per_request
    unit_month = a.local_hardware_price / a.local_lifetime_months + \
        a.local_power_watts * HOURS_PER_MONTH / 1000 * a.electricity_price_per_kwh
    cloud: dict[str, Any] = {
        "where": "cloud", "model": "original",
        "latency_p90_ms": a.network_rtt_ms + upload_ms + cloud_compute_ms,
        "latency_formula": f"RTT {a.network_rtt_ms:g} + upload {upload_ms:.3f} (payload x 8 / upload bandwidth) + "
                           f"compute {cloud_compute_ms:.3f} (original p90 / cloud_speedup) ms",
        "throughput_per_unit": cloud_rate, "units": cloud_instances,
        "units_formula": f"ceil(peak {peak_qps:.2f} QPS / ({cloud_rate:.1f}/s x utilization {a.cloud_utilization:g}))",
        "cost_per_month": cloud_month,
        "cost_formula": f"{cloud_instances} instance(s) x {a.cloud_price_per_hour:g} USD/h x {HOURS_PER_MONTH:g} h + "
                        f"{per_month:,.0f} requests x {egress_per_request:.3g} USD egress",
        "energy_mj": a.cloud_instance_watts / cloud_rate * 1e3, "energy_method": "estimated",
        "energy_formula": f"{a.cloud_instance_watts:g} W / {cloud_rate:.1f} inferences/s",
        "data_leaving_device": f"every request's input ({a.payload_bytes:,.0f} bytes) goes to the cloud provider; "
                               f"{a.response_bytes:,.0f} bytes come back",
        "update_path": "redeploy the model on the cloud instances (one place, no device involved)",
    }
    sides = [cloud]
    for label, figures in (("original", original), ("compressed", compressed)):
        rate = figures["throughput_items_per_s"]
        units = max(1, math.ceil(peak_qps / rate))
        energy = figures.get("energy_mj")
        sides.append({
            "where": "local", "model": label, "latency_p90_ms": figures["latency_p90_ms"],
            "latency_formula": f"measured p90 on this machine ({figures['latency_p90_ms']:.3f} ms), no network",
            "throughput_per_unit": rate, "units": units,
            "units_formula": f"ceil(peak {peak_qps:.2f} QPS / {rate:.1f}/s)",
            "cost_per_month": units * unit_month,
            "cost_formula": f"{units} machine(s) x ({a.local_hardware_price:g} USD / {a.local_lifetime_months:g} months "
                            f"+ {a.local_power_watts:g} W x {HOURS_PER_MONTH:g} h x {a.electricity_price_per_kwh:g} USD/kWh)",
            "energy_mj": energy, "energy_method": figures.get("energy_method") or "not measured",
            "energy_formula": "measured CPU time per inference x watts per busy core (compactai.measure.energy)",
            "data_leaving_device": "no inference data leaves the device; only update downloads (and opt-in telemetry "
                                   "counters, never payloads)",
            "update_path": "signed OTA: a bundle signed with Ed25519, published through a TUF repository, "
                           "installed A/B by the update agent with probation and rollback (compactai update)",
        })
    for side in sides:
        side["needed_qps"] = peak_qps
        side["available_qps"] = side["throughput_per_unit"] * side["units"]
        side["cost_per_million"] = side["cost_per_month"] / per_month * 1e6 if per_month else None
        side["quality"] = (original if side["model"] == "original" else compressed).get("quality")
    break_even = unit_month / cloud_per_request if cloud_per_request else None
    return {
        "assumptions": a.table(), "requests_per_month": per_month, "peak_qps": peak_qps, "sides": sides,
        "break_even": {
            "requests_per_month": break_even,
            "requests_per_day": break_even / (365 / 12) if break_even else None,
            "formula": f"one local machine's monthly cost {unit_month:.2f} USD / cloud cost per request "
                       f"{cloud_per_request:.3g} USD (instance-hour price / (throughput x utilization x 3600) + egress)",
            "meaning": "Above this volume one local machine costs less than paying the cloud per request; "
                       "it holds up to one machine's capacity.",
        },
        "cheapest": min(sides, key=lambda s: s["cost_per_month"])["where"] + ":" +
                    min(sides, key=lambda s: s["cost_per_month"])["model"],
    }


__all__ = ["ASSUMPTIONS", "HOURS_PER_MONTH", "Assumptions", "decide", "figures_of", "load_assumptions"]
