"""Drift detection on the digits data: calibrated false alarms, detection within one window, the
profile as JSON and files, the disabled monitor, thread safety, and the statistics themselves."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from scipy.stats import binom, ks_2samp

from compactai.errors import BadInputError, ParameterError
from compactai.measure.drift import (
    PROFILE_FILE,
    build_profile,
    calibrate,
    decode_array,
    holm_rejected,
    ks_pvalues,
    ks_statistics,
    load_profile,
    save_profile,
)
from compactai.runtime.drift import NO_PROFILE, DriftMonitor

WINDOW = 200
ALPHA = 0.01


def shift_right(images: np.ndarray, pixels: int = 2) -> np.ndarray:
    """Move the digits right by ``pixels``, filling with the background value."""
    shifted = np.full_like(images, images.min())
    shifted[..., pixels:] = images[..., :-pixels]
    return shifted


DRIFTS = {
    "inverted": lambda images, rng: -images,  # images are scaled to [-1, 1]: inversion is negation
    "noised": lambda images, rng: (images + rng.normal(0, 0.2, images.shape)).astype(np.float32),
    "shifted-2px": lambda images, rng: shift_right(images, 2),
}


@pytest.fixture(scope="module")
def digits_setup():
    """The project's digits splits, a nearest-centroid classifier (instant, ~90% accurate) as the
    model, and a profile from the calibration + validation splits; the test split is live traffic."""
    from compactai.examples.digits import load_digits_splits

    splits = load_digits_splits()
    train = splits["train"].inputs["image"].reshape(len(splits["train"]), -1)
    centroids = np.stack([train[splits["train"].labels == c].mean(axis=0) for c in range(10)])

    def model(images: np.ndarray) -> list[np.ndarray]:
        flat = images.reshape(len(images), -1)
        return [-((flat[:, None, :] - centroids[None]) ** 2).sum(axis=2).astype(np.float32)]

    reference = np.concatenate([splits["calibration"].inputs["image"], splits["validation"].inputs["image"]])
    profile = build_profile({"image": reference}, model(reference), kind="classifier", window=WINDOW,
                            alpha=ALPHA, seed=0)
    return model, splits["test"].inputs["image"], profile


def feed(monitor: DriftMonitor, model, images: np.ndarray, batch: int = 25) -> None:
    for start in range(0, len(images), batch):
        part = images[start : start + batch]
        monitor.observe({"image": part}, model(part))


def test_profile_is_json_and_calibrated_to_alpha(digits_setup):
    _, _, profile = digits_setup
    assert json.loads(json.dumps(profile)) == profile
    assert [t["name"] for t in profile["tests"]] == ["ks:image", "js:0"]
    calibration = profile["calibration"]
    assert calibration["false_alarm_rate"] <= ALPHA
    assert calibration["windows"] >= 1000 and calibration["fit_samples"] + calibration["calibration_samples"] == 436
    assert ALPHA / 2 <= profile["alpha_per_test"] <= ALPHA


def test_false_alarm_rate_on_same_distribution_windows(digits_setup):
    """300 shuffled windows of the unseen test split: alarms at most alpha plus a binomial margin."""
    model, test_images, profile = digits_setup
    rng = np.random.default_rng(1)
    monitor = DriftMonitor.from_profile(profile)
    windows, alarms = 300, 0
    for _ in range(windows):
        monitor.reset()
        feed(monitor, model, test_images[rng.choice(len(test_images), WINDOW, replace=False)], batch=50)
        report = monitor.report()
        assert report["ready"] and report["samples_in_window"] == WINDOW
        alarms += report["alarm"]
    allowed = binom.ppf(0.99, windows, ALPHA)  # 8 of 300: the 99th percentile if the true rate were alpha
    assert alarms <= allowed, f"{alarms} false alarms in {windows} windows (allowed {allowed:.0f})"


@pytest.mark.parametrize("drift", sorted(DRIFTS))
def test_drift_is_flagged_within_one_window(digits_setup, drift):
    model, test_images, profile = digits_setup
    rng = np.random.default_rng(2)
    monitor = DriftMonitor.from_profile(profile)
    feed(monitor, model, test_images[rng.choice(len(test_images), WINDOW, replace=False)])
    clean = monitor.report()
    assert clean["ready"] and not clean["alarm"], clean["scores"]
    drifted = DRIFTS[drift](test_images[rng.choice(len(test_images), WINDOW, replace=False)], rng)
    feed(monitor, model, drifted)  # one window of drifted traffic replaces the clean one
    report = monitor.report()
    assert report["alarm"], f"{drift} not flagged: scores {report['scores']}, thresholds {report['thresholds']}"
    inputs_test = next(t for t in report["tests"] if t["name"] == "ks:image")
    assert inputs_test["alarm"] and inputs_test["detail"]["drifted_features"]
    assert report["samples_seen"] == 2 * WINDOW


def test_profile_round_trips_through_json_and_files(digits_setup, tmp_path):
    model, test_images, profile = digits_setup
    written = save_profile(profile, tmp_path)
    assert written == tmp_path / PROFILE_FILE and sorted(p.name for p in tmp_path.iterdir()) == [PROFILE_FILE]
    components = json.loads(written.read_text())["tests"][0]["state"]["components"]
    assert components["shape"] == [16, 32 * 32] and decode_array(components).shape == (16, 1024)
    monitors = [DriftMonitor.from_profile(profile), DriftMonitor.from_profile(json.loads(json.dumps(profile))),
                DriftMonitor.from_profile(tmp_path / PROFILE_FILE), DriftMonitor.from_profile(load_profile(tmp_path))]
    traffic = DRIFTS["noised"](test_images[:WINDOW], np.random.default_rng(3))
    reports = []
    for monitor in monitors:
        feed(monitor, model, traffic)
        reports.append(monitor.report())
    assert reports[0]["alarm"]
    for other in reports[1:]:
        assert other["scores"] == reports[0]["scores"] and other["thresholds"] == reports[0]["thresholds"]


def test_monitor_without_profile_says_why():
    monitor = DriftMonitor.from_profile(None)
    monitor.observe({"image": np.zeros((3, 1, 32, 32), np.float32)}, [np.zeros((3, 10), np.float32)])
    assert monitor.report() == {"enabled": False, "reason": NO_PROFILE}
    assert not monitor.enabled


def test_warming_up_window_never_alarms(digits_setup):
    model, test_images, profile = digits_setup
    monitor = DriftMonitor.from_profile(profile)
    feed(monitor, model, -test_images[:50])  # drifted, but only a quarter of a window
    report = monitor.report()
    assert (report["ready"], report["alarm"], report["samples_in_window"]) == (False, False, 50)
    assert "warming up: 50 of 200" in report["reason"]


def test_odd_traffic_is_counted_as_skipped_not_raised(digits_setup):
    model, test_images, profile = digits_setup
    monitor = DriftMonitor.from_profile(profile)
    monitor.observe({"pixels": test_images[:4]}, model(test_images[:4]))
    monitor.observe({"image": test_images[:5, :, :16, :16]}, model(test_images[:5]))  # another shape
    report = monitor.report()
    assert (report["samples_skipped"], report["samples_seen"]) == (9, 0)
    assert "skip_reason" in report


def test_observe_is_thread_safe(digits_setup):
    model, test_images, profile = digits_setup
    monitor = DriftMonitor.from_profile(profile)
    outputs = model(test_images)
    errors: list[BaseException] = []

    def client(offset: int) -> None:
        try:
            for i in range(40):
                start = (offset * 40 + i) * 2 % (len(test_images) - 2)
                monitor.observe({"image": test_images[start : start + 2]}, [outputs[0][start : start + 2]])
                if i % 10 == 0:
                    monitor.report()
        except BaseException as exc:  # noqa: BLE001 (any error in a thread must reach the assert below)
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    report = monitor.report()
    assert (report["samples_seen"], report["samples_in_window"], report["ready"]) == (320, WINDOW, True)
    assert not report["alarm"]


def test_embedding_profile_uses_mmd_and_catches_a_moved_cluster():
    """A small embedding model's shape: token ids + attention mask in, token vectors out."""
    rng = np.random.default_rng(0)

    def traffic(n: int, centre: float) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        lengths = rng.integers(3, 12, n)
        mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
        ids = rng.integers(1, 500, (n, 12)) * mask
        hidden = rng.normal(0, 1, (n, 12, 8)) + centre
        return {"input_ids": ids, "attention_mask": mask}, [hidden.astype(np.float32)]

    inputs, outputs = traffic(240, 0.0)
    profile = build_profile(inputs, outputs, kind="embedding", window=60, seed=0, calibration_windows=500)
    assert [t["test"] for t in profile["tests"]] == ["ks", "ks", "mmd"]
    same, moved = DriftMonitor.from_profile(profile), DriftMonitor.from_profile(profile)
    same.observe(*traffic(60, 0.0))
    moved.observe(*traffic(60, 0.6))
    assert not same.report()["alarm"]
    assert moved.report()["alarm"] and moved.report()["scores"]["mmd:0"] > moved.report()["thresholds"]["mmd:0"]


def test_ks_statistics_match_scipy():
    rng = np.random.default_rng(0)
    reference, window = rng.normal(0, 1, (150, 3)), rng.normal(0.3, 1, (90, 3))
    ours = ks_statistics(np.sort(reference, axis=0), window)
    for j in range(3):
        scipy_result = ks_2samp(reference[:, j], window[:, j], method="asymp")
        assert ours[j] == pytest.approx(scipy_result.statistic, abs=1e-12)
        assert ks_pvalues(ours[j : j + 1], 150, 90)[0] == pytest.approx(scipy_result.pvalue, rel=0.3, abs=1e-6)
    pvalues = ks_pvalues(np.sort(ours), 150, 90)
    assert np.all(np.diff(pvalues) < 0)  # a larger gap, a smaller p-value


def test_calibrate_holds_the_union_rate_and_holm_steps_down():
    statistics = np.random.default_rng(0).normal(size=(4000, 3))
    statistics[:, 2] = statistics[:, 1]  # two identical tests: the union needs less than a 3-way split
    thresholds, level = calibrate(statistics, 0.01)
    assert (statistics > thresholds).any(axis=1).mean() <= 0.01
    assert 0.01 / 3 < level <= 0.01
    assert holm_rejected(np.array([0.001, 0.04, 0.012, 0.5]), 0.05) == [0, 2]


def test_build_profile_refuses_bad_parameters_and_too_little_data():
    images, outputs = np.zeros((100, 4), np.float32), [np.zeros((100, 2), np.float32)]
    with pytest.raises(ParameterError, match="'kind'"):
        build_profile({"x": images}, outputs, kind="ranker")
    with pytest.raises(ParameterError, match="'alpha'"):
        build_profile({"x": images}, outputs, alpha=0.7)
    with pytest.raises(BadInputError, match="needs at least 200 reference samples; got 100"):
        build_profile({"x": images}, outputs, window=200)
