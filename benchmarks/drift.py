"""Drift detection on the digits teacher (issue 17, item 4).

The reference profile is built as `compactai bundle --example digits` builds it (calibration +
validation splits through the ONNX model); live traffic is the unseen test split. Measures:

- false alarms: the fraction of same-distribution windows (shuffled test split) that alarm, at
  alpha 0.01 and 0.05, for profiles built with three calibration seeds, with a 95% upper bound;
- detection: inverted, noised and 2-pixel-shifted digits (and milder variants, to show the
  limits): the fraction of fully drifted windows flagged, and how many windows of drifted traffic
  stream through a monitor full of clean traffic before it alarms;
- cost: profile build time, observe() per request, report() per window (median and p90).

Run it under the benchmark lock:

    flock /tmp/compactai-bench.lock .venv/bin/python benchmarks/drift.py [--windows 500] [--model centroid]

Prints tables and writes the "drift" section of benchmarks/results/serve.json (other sections,
e.g. "server", are kept as they are).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from _results import write_section
from rich.console import Console
from rich.table import Table
from scipy.stats import beta

from compactai.measure.drift import PROFILE_FILE, build_profile, save_profile
from compactai.runtime.drift import DriftMonitor

RESULTS = Path(__file__).parent / "results" / "serve.json"
WINDOW = 200
console = Console(width=130)
Model = Callable[[np.ndarray], list[np.ndarray]]


def shift_right(images: np.ndarray, pixels: int) -> np.ndarray:
    shifted = np.full_like(images, images.min())
    shifted[..., pixels:] = images[..., :-pixels]
    return shifted


def noised(sigma: float) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    return lambda images, rng: (images + rng.normal(0, sigma, images.shape)).astype(np.float32)


DRIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "inverted": lambda images, rng: -images,
    "noise sigma 0.2": noised(0.2),
    "shift 2px": lambda images, rng: shift_right(images, 2),
    # milder variants: where the detector's limits are
    "noise sigma 0.05": noised(0.05),
    "shift 1px": lambda images, rng: shift_right(images, 1),
}


def teacher_model() -> tuple[Model, str]:
    """The digits teacher exported to ONNX, run in ONNX Runtime on one thread (as served)."""
    import onnxruntime as ort

    from compactai import load_example

    example = load_example("digits")
    path = Path(tempfile.mkdtemp(prefix="drift-bench-")) / "teacher.onnx"
    example.handle.to_onnx(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    return (lambda images: session.run(None, {"image": images})), "digits teacher (ResNet, ONNX Runtime)"


def centroid_model(splits: dict[str, Any]) -> tuple[Model, str]:
    """A nearest-centroid classifier: instant, for a quick run."""
    train = splits["train"].inputs["image"].reshape(len(splits["train"]), -1)
    centroids = np.stack([train[splits["train"].labels == c].mean(axis=0) for c in range(10)])

    def model(images: np.ndarray) -> list[np.ndarray]:
        flat = images.reshape(len(images), -1)
        return [-((flat[:, None, :] - centroids[None]) ** 2).sum(axis=2).astype(np.float32)]

    return model, "nearest centroid (numpy)"


def feed(monitor: DriftMonitor, images: np.ndarray, outputs: np.ndarray, batch: int = 50) -> None:
    for start in range(0, len(images), batch):
        monitor.observe({"image": images[start : start + batch]}, [outputs[start : start + batch]])


def upper_95(alarms: int, windows: int) -> float:
    """One-sided 95% Clopper-Pearson upper bound of a rate."""
    return 1.0 if alarms == windows else float(beta.ppf(0.95, alarms + 1, windows - alarms))


def false_alarms(profile: dict[str, Any], images: np.ndarray, outputs: np.ndarray, windows: int,
                 seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    monitor = DriftMonitor.from_profile(profile)
    alarms, by_test = 0, dict.fromkeys(monitor.report()["thresholds"], 0)
    for _ in range(windows):
        picks = rng.choice(len(images), WINDOW, replace=False)
        monitor.reset()
        feed(monitor, images[picks], outputs[picks])
        report = monitor.report()
        alarms += report["alarm"]
        for test in report["tests"]:
            by_test[test["name"]] += test["alarm"]
    return {"windows": windows, "alarms": alarms, "rate": alarms / windows, "upper_95": upper_95(alarms, windows),
            "by_test": {k: v / windows for k, v in by_test.items()}}


def detection(profile: dict[str, Any], model: Model, images: np.ndarray, drift: str, trials: int,
              seed: int) -> dict[str, Any]:
    """Flagged fraction of fully drifted windows; and drifted samples streamed (10 per request) into a
    monitor full of clean traffic until it alarms, in windows."""
    rng = np.random.default_rng(seed)
    flagged, to_detect = 0, []
    for trial in range(trials):
        drifted = DRIFTS[drift](images[rng.choice(len(images), WINDOW, replace=False)], rng)
        monitor = DriftMonitor.from_profile(profile)
        feed(monitor, drifted, model(drifted)[0])
        flagged += monitor.report()["alarm"]
        if trial >= trials // 5:
            continue  # streaming is slower (a report per request): a fifth of the trials
        clean = images[rng.choice(len(images), WINDOW, replace=False)]
        monitor = DriftMonitor.from_profile(profile)
        feed(monitor, clean, model(clean)[0])
        seen = None
        for start in range(0, WINDOW * 2, 10):
            part = DRIFTS[drift](images[rng.choice(len(images), 10, replace=False)], rng)
            monitor.observe({"image": part}, model(part))
            if monitor.report()["alarm"]:
                seen = start + 10
                break
        to_detect.append(seen / WINDOW if seen is not None else None)
    found = [w for w in to_detect if w is not None]
    return {"drift": drift, "windows": trials, "detection_rate": flagged / trials,
            "windows_to_detect_median": statistics.median(found) if found else None,
            "windows_to_detect_max": max(found) if found else None,
            "stream_trials": len(to_detect), "stream_missed_after_2_windows": len(to_detect) - len(found)}


def timings(profile: dict[str, Any], images: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
    monitor = DriftMonitor.from_profile(profile)
    feed(monitor, images[:WINDOW], outputs[:WINDOW])
    result = {}
    for batch in (1, 32):
        times = []
        for i in range(300):
            start = (i * batch) % (len(images) - batch)
            began = time.perf_counter()
            monitor.observe({"image": images[start : start + batch]}, [outputs[start : start + batch]])
            times.append((time.perf_counter() - began) * 1e3)
        result[f"observe_batch{batch}_ms_p50"] = statistics.median(times)
        result[f"observe_batch{batch}_ms_p90"] = float(np.quantile(times, 0.9))
    times = []
    for i in range(100):
        monitor.observe({"image": images[i : i + 1]}, [outputs[i : i + 1]])  # a new sample: no cached report
        began = time.perf_counter()
        monitor.report()
        times.append((time.perf_counter() - began) * 1e3)
    result["report_per_window_ms_p50"] = statistics.median(times)
    result["report_per_window_ms_p90"] = float(np.quantile(times, 0.9))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=500, help="same-distribution windows per profile")
    parser.add_argument("--trials", type=int, default=100, help="drifted windows per drift")
    parser.add_argument("--model", choices=("teacher", "centroid"), default="teacher")
    args = parser.parse_args()

    from compactai.examples.digits import load_digits_splits

    splits = load_digits_splits()
    model, model_name = teacher_model() if args.model == "teacher" else centroid_model(splits)
    reference = np.concatenate([splits["calibration"].inputs["image"], splits["validation"].inputs["image"]])
    reference_outputs = model(reference)
    test_images = splits["test"].inputs["image"]
    test_outputs = model(test_images)[0]
    console.print(f"model: {model_name}; reference {len(reference)} samples (calibration + validation), "
                  f"live traffic: test split ({len(test_images)} samples), window {WINDOW}")

    profiles: dict[tuple[float, int], dict[str, Any]] = {}
    build_ms = []
    for alpha in (0.01, 0.05):
        for seed in (0, 1, 2):
            began = time.perf_counter()
            profiles[alpha, seed] = build_profile({"image": reference}, reference_outputs, kind="classifier",
                                                  window=WINDOW, alpha=alpha, seed=seed)
            build_ms.append((time.perf_counter() - began) * 1e3)
    with tempfile.TemporaryDirectory() as tmp:
        profile_bytes = save_profile(profiles[0.01, 0], tmp).stat().st_size

    rows = []
    table = Table(title=f"False alarms on same-distribution windows ({args.windows} per profile)")
    for column in ("alpha", "calibration seed", "alarms", "rate", "95% upper", "calibration rate", "per test"):
        table.add_column(column)
    for (alpha, seed), profile in profiles.items():
        measured = false_alarms(profile, test_images, test_outputs, args.windows, seed=100 + seed)
        row = {"alpha": alpha, "calibration_seed": seed, **measured,
               "calibration_rate": profile["calibration"]["false_alarm_rate"],
               "thresholds": {t["name"]: t["threshold"] for t in profile["tests"]}}
        rows.append(row)
        table.add_row(f"{alpha}", f"{seed}", f"{measured['alarms']}/{args.windows}", f"{measured['rate']:.4f}",
                      f"{measured['upper_95']:.4f}", f"{row['calibration_rate']:.4f}",
                      ", ".join(f"{k} {v:.3f}" for k, v in measured["by_test"].items()))
    console.print(table)

    detected = []
    table = Table(title=f"Detection at alpha 0.01 ({args.trials} drifted windows each)")
    for column in ("drift", "detection rate", "windows to detect (median / max)", "missed after 2 windows"):
        table.add_column(column)
    for drift in DRIFTS:
        result = detection(profiles[0.01, 0], model, test_images, drift, args.trials, seed=7)
        detected.append(result)
        median, worst = result["windows_to_detect_median"], result["windows_to_detect_max"]
        table.add_row(drift, f"{result['detection_rate']:.2f}",
                      f"{median:.2f} / {worst:.2f}" if median is not None else "-",
                      f"{result['stream_missed_after_2_windows']}/{result['stream_trials']}")
    console.print(table)

    cost = {"profile_build_ms_median": statistics.median(build_ms), "profile_json_bytes": profile_bytes,
            "calibration_windows": profiles[0.01, 0]["calibration"]["windows"],
            **timings(profiles[0.01, 0], test_images, test_outputs)}
    table = Table(title="Cost")
    table.add_column("figure")
    table.add_column("value")
    for key, value in cost.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else f"{value:,}")
    console.print(table)

    report = {"model": model_name, "window": WINDOW, "reference": "digits calibration + validation splits",
              "live": "digits test split, shuffled windows", "profile_file": PROFILE_FILE,
              "false_alarms": rows, "detection": detected, "cost": cost,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_section(RESULTS, "drift", report)  # other sections (e.g. "server") belong to other benchmarks
    console.print(f"wrote the 'drift' section of {RESULTS}")


if __name__ == "__main__":
    main()
