"""Drift statistics: a reference profile of a model's data, and tests that compare a window of live
traffic with it at a calibrated false-alarm rate (the server's monitor is compactai.runtime.drift).

Each test is a small strategy in ``DRIFT_TESTS`` with four steps: ``raw`` (model inputs/outputs ->
one row per sample), ``fit`` (reference rows -> state), ``features`` (state, rows -> what a
window keeps per sample) and ``statistic`` (state, window -> score, detail; higher = more drift):

- ``ks``  per-feature two-sample Kolmogorov–Smirnov, Bonferroni over features (Holm names the
  drifted ones). Inputs are first reduced to a few features: the scores on the top principal
  components of the reference plus the log reconstruction error. Per-pixel tests would need a
  1024-fold correction and miss changes that move pixels together (a shift); the components
  follow how reference samples vary, and the residual catches what lies outside them (noise,
  inversion). Integer inputs (token ids) become bags of hashed ids plus their length first.
- ``js``  Jensen–Shannon distance between predicted-class histograms (classifiers). Classes,
  not softmax confidences: reference data may include training samples, whose confidences run
  higher than live traffic's even without drift.
- ``mmd`` squared maximum mean discrepancy with an RBF kernel (median-heuristic bandwidth) on
  mean-pooled, L2-normalised embeddings (embedding models).

Thresholds are measured, not assumed: ``build_profile`` splits the reference into a fit part
(the tests' state) and a calibration part, draws many same-distribution windows from the
calibration part, and sets every test's threshold at the same upper quantile of its statistic,
chosen so that the fraction of calibration windows on which *any* test alarms equals ``alpha``.
Windows are drawn with replacement, so their statistics also carry the calibration part's own
sampling error: the calibrated rate errs on the safe (fewer alarms) side.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import kstwobign
from threadpoolctl import ThreadpoolController  # installed with scikit-learn, which depends on it

from compactai.errors import BadInputError, ParameterError, UnknownNameError
from compactai.measure.drift_json import (
    FORMAT,
    PROFILE_FILE,
    decode_array,
    encode_array,
    load_profile,
    save_profile,
    to_json,
    with_arrays,
)
from compactai.tasks import mean_pool, normalize

__all__ = [
    "DRIFT_TESTS", "FORMAT", "KINDS", "PROFILE_FILE", "DriftTest", "build_profile", "calibrate", "decode_array",
    "encode_array", "holm_rejected", "ks_pvalues", "ks_statistics", "load_profile", "save_profile", "to_json",
    "window_features", "window_scores", "with_arrays",
]

KINDS = ("classifier", "embedding", "regression")
COMPONENTS = 16  # principal components per input: enough for digits' main modes, a mild x17 correction
TOKEN_BUCKETS = 64
MIN_PART = 20
Arrays = dict[str, np.ndarray]
State = dict[str, Any]


@functools.lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run small matrix products on one BLAS thread. These products are tiny (a request's rows times
    16 components, 200x200 kernels); OpenBLAS's thread pool made them tens of times slower on a busy
    2-core machine, where the server's ONNX Runtime threads compete for the same cores."""
    with _blas().limit(limits=1, user_api="blas"):
        yield


# ---- per-sample rows -------------------------------------------------------------------------------

def sample_rows(array: np.ndarray) -> np.ndarray:
    """One float row per sample: floats flattened; integer ids as a bag of hashed ids plus the count
    of non-zero ids (the length, when 0 pads), so rows of different sequence lengths compare."""
    array = np.asarray(array)
    if array.ndim == 0:
        raise BadInputError("Drift statistics need a batch axis; got a scalar.")
    flat = array.reshape(len(array), -1)
    if array.dtype.kind == "f":
        return flat.astype(np.float64)
    ids = flat.astype(np.int64)
    rows = np.zeros((len(flat), TOKEN_BUCKETS + 1))
    for i, row in enumerate(ids):
        present = row[row != 0]  # 0 pads: how far a client pads must not look like drift
        if len(present):
            rows[i, :TOKEN_BUCKETS] = np.bincount(present % TOKEN_BUCKETS, minlength=TOKEN_BUCKETS) / len(present)
        rows[i, TOKEN_BUCKETS] = len(present)
    return rows


def pooled_embeddings(output: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Sentence embeddings: token vectors mean-pooled over the attention mask, L2-normalised."""
    output = np.asarray(output)
    if output.ndim == 1:
        output = output[:, None]
    if output.ndim > 3:
        output = output.reshape(len(output), -1)
    if output.ndim == 3 and mask is not None:
        # the mask may be padded wider than a trimmed batch's outputs, or the other way round
        width = output.shape[1]
        mask = mask[:, :width] if mask.shape[1] >= width else np.pad(mask, ((0, 0), (0, width - mask.shape[1])))
    return normalize(mean_pool(output, mask if output.ndim == 3 else None))


def target_array(target: str, inputs: Arrays, outputs: list[np.ndarray]) -> np.ndarray:
    """The array a test looks at: ``input:NAME`` or ``output:INDEX``."""
    where, _, name = target.partition(":")
    if where == "input":
        if name not in inputs:
            raise BadInputError(f"Input {name!r} is missing; the drift profile expects {name!r}.")
        return np.asarray(inputs[name])
    return np.asarray(outputs[int(name)])


# ---- the tests ---------------------------------------------------------------------------------------

def ks_statistics(reference_sorted: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Two-sample KS statistic per column (scipy.stats.ks_2samp's D), vectorised: the largest gap
    between the two empirical CDFs, evaluated at every observed value."""
    result = np.empty(window.shape[1])
    n, m = len(reference_sorted), len(window)
    for j in range(window.shape[1]):
        ref, win = reference_sorted[:, j], np.sort(window[:, j])
        points = np.concatenate([ref, win])
        gap = np.searchsorted(ref, points, "right") / n - np.searchsorted(win, points, "right") / m
        result[j] = np.abs(gap).max()
    return result


def ks_pvalues(statistics: np.ndarray, n: int, m: int) -> np.ndarray:
    """Asymptotic two-sample KS p-values from the Kolmogorov limit distribution at the effective
    sample size n*m/(n+m). ks_2samp(method='asymp') uses the finite-n distribution (kstwo), which is
    100x slower per call and differs by up to ~25% at these sizes; the thresholds are calibrated
    empirically, so only the order of the p-values matters."""
    return np.clip(kstwobign.sf(statistics * np.sqrt(n * m / (n + m))), 0.0, 1.0)


def holm_rejected(pvalues: np.ndarray, alpha: float) -> list[int]:
    """Indices Holm's step-down procedure rejects at family-wise level ``alpha``."""
    order = np.argsort(pvalues)
    rejected = []
    for rank, index in enumerate(order):
        if pvalues[index] > alpha / (len(pvalues) - rank):
            break
        rejected.append(int(index))
    return rejected


def _ks_raw(target: str, inputs: Arrays, outputs: list[np.ndarray]) -> np.ndarray:
    return sample_rows(target_array(target, inputs, outputs))


def _ks_fit(rows: np.ndarray, alpha: float) -> State:
    # The components come from one half of the fit rows and the KS reference from the other: the
    # rows a PCA was fitted on reconstruct better than any new sample, so a reference made of them
    # would make every live window look drifted in the residual.
    basis, held_out = rows[: len(rows) // 2], rows[len(rows) // 2 :]
    mean = basis.mean(axis=0)
    k = int(min(COMPONENTS, len(basis) - 1, rows.shape[1]))
    _, _, vt = np.linalg.svd(basis - mean, full_matrices=False)
    state: State = {"mean": mean.astype(np.float32), "components": vt[:k].astype(np.float32),
                    "residual": k < rows.shape[1], "alpha": alpha}
    state["reference"] = np.sort(_ks_features(state, held_out), axis=0).astype(np.float32)
    return state


def _ks_features(state: State, rows: np.ndarray) -> np.ndarray:
    centred = rows - np.asarray(state["mean"], dtype=np.float64)
    components = np.asarray(state["components"], dtype=np.float64)
    scores = centred @ components.T
    if not state["residual"]:
        return scores
    residual = ((centred - scores @ components) ** 2).sum(axis=1)
    return np.column_stack([scores, np.log(residual + 1e-12)])


def _ks_statistic(state: State, window: np.ndarray) -> tuple[float, dict[str, Any]]:
    reference = np.asarray(state["reference"], dtype=np.float64)
    statistics = ks_statistics(reference, window)
    pvalues = ks_pvalues(statistics, len(reference), len(window))
    bonferroni = min(1.0, float(pvalues.min()) * len(pvalues))
    names = [f"pc{i}" for i in range(len(np.asarray(state["components"])))] + (["residual"] if state["residual"] else [])
    return -np.log10(max(bonferroni, 1e-300)), {
        "features": len(pvalues), "max_ks": float(statistics.max()), "min_p_bonferroni": bonferroni,
        "drifted_features": [names[i] for i in holm_rejected(pvalues, float(state["alpha"]))],
    }


def _js_raw(target: str, inputs: Arrays, outputs: list[np.ndarray]) -> np.ndarray:
    output = target_array(target, inputs, outputs)
    labels = output.reshape(len(output)) if output.ndim == 1 else output.reshape(len(output), -1).argmax(axis=1)
    return labels.astype(np.float64)[:, None]


def _js_fit(rows: np.ndarray, alpha: float) -> State:
    classes = int(rows.max()) + 1
    return {"classes": classes, "reference": _histogram(rows, classes).astype(np.float32)}


def _histogram(rows: np.ndarray, classes: int) -> np.ndarray:
    """Class frequencies with one extra bin for classes the reference never saw, add-half smoothed."""
    labels = np.clip(rows[:, 0].astype(np.int64), 0, classes)
    counts = np.bincount(labels, minlength=classes + 1).astype(np.float64) + 0.5
    return counts / counts.sum()


def _js_statistic(state: State, window: np.ndarray) -> tuple[float, dict[str, Any]]:
    reference = np.asarray(state["reference"], dtype=np.float64)
    live = _histogram(window, int(state["classes"]))
    distance = float(jensenshannon(reference, live, base=2))
    return distance, {"live_histogram": [round(float(v), 4) for v in live],
                      "reference_histogram": [round(float(v), 4) for v in reference]}


def _mmd_raw(target: str, inputs: Arrays, outputs: list[np.ndarray]) -> np.ndarray:
    return pooled_embeddings(target_array(target, inputs, outputs), inputs.get("attention_mask"))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.clip((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0, None)


def _mmd_fit(rows: np.ndarray, alpha: float) -> State:
    reference = rows.astype(np.float32).astype(np.float64)
    distances = _squared_distances(reference, reference)
    median = float(np.median(distances[np.triu_indices(len(reference), 1)]))
    gamma = 1.0 / max(median, 1e-12)  # exp(-d^2 / median d^2): the median heuristic
    kernel = np.exp(-gamma * distances)
    within = (kernel.sum() - np.trace(kernel)) / (len(kernel) * (len(kernel) - 1))
    return {"reference": reference.astype(np.float32), "gamma": gamma, "within_reference": float(within)}


def _mmd_statistic(state: State, window: np.ndarray) -> tuple[float, dict[str, Any]]:
    reference, gamma = np.asarray(state["reference"], dtype=np.float64), float(state["gamma"])
    k_ww = np.exp(-gamma * _squared_distances(window, window))
    within = (k_ww.sum() - np.trace(k_ww)) / (len(window) * (len(window) - 1))
    across = float(np.exp(-gamma * _squared_distances(window, reference)).mean())
    mmd2 = float(state["within_reference"]) + float(within) - 2 * across  # unbiased MMD^2
    return mmd2, {"bandwidth_gamma": gamma}


@dataclass(frozen=True)
class DriftTest:
    """A drift test as four small steps (see the module docstring)."""

    raw: Callable[[str, Arrays, list[np.ndarray]], np.ndarray]
    fit: Callable[[np.ndarray, float], State]
    features: Callable[[State, np.ndarray], np.ndarray]
    statistic: Callable[[State, np.ndarray], tuple[float, dict[str, Any]]]


DRIFT_TESTS: dict[str, DriftTest] = {
    "ks": DriftTest(_ks_raw, _ks_fit, _ks_features, _ks_statistic),
    "js": DriftTest(_js_raw, _js_fit, lambda state, rows: rows, _js_statistic),
    "mmd": DriftTest(_mmd_raw, _mmd_fit, lambda state, rows: rows, _mmd_statistic),
}
# the test on output 0 by model kind; every input gets a "ks" test
OUTPUT_TESTS: dict[str | None, str] = {"classifier": "js", "embedding": "mmd", "regression": "ks", None: "ks"}


def drift_test(name: str) -> DriftTest:
    if name not in DRIFT_TESTS:
        raise UnknownNameError(f"Unknown drift test {name!r}; known tests: {', '.join(DRIFT_TESTS)}.")
    return DRIFT_TESTS[name]


def window_features(profile: dict[str, Any], inputs: Arrays, outputs: list[np.ndarray]) -> list[np.ndarray]:
    """What a window keeps per sample, one array per test of the profile (rows = samples)."""
    with one_blas_thread():
        return [drift_test(spec["test"]).features(spec["state"],
                                                  drift_test(spec["test"]).raw(spec["target"], inputs, outputs))
                for spec in profile["tests"]]


def window_scores(profile: dict[str, Any], windows: list[np.ndarray]) -> list[tuple[float, dict[str, Any]]]:
    """(score, detail) of every test of the profile on one window of features."""
    with one_blas_thread():
        return [drift_test(spec["test"]).statistic(spec["state"], rows)
                for spec, rows in zip(profile["tests"], windows)]


# ---- building a profile ------------------------------------------------------------------------------

def calibrate(statistics: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Per-test thresholds from calibration windows (rows) x tests (columns): each test's (1 - q)
    quantile, with the largest q in [alpha / tests, alpha] for which the fraction of windows where
    any test exceeds its threshold stays at most ``alpha``. Returns (thresholds, q)."""
    tests = statistics.shape[1]

    def thresholds(level: float) -> np.ndarray:
        return np.quantile(statistics, 1.0 - level, axis=0, method="higher")

    def union_rate(level: float) -> float:
        return float((statistics > thresholds(level)).any(axis=1).mean())

    low, high = alpha / tests, alpha
    if union_rate(high) <= alpha:
        low = high
    for _ in range(40):
        if high - low < 1e-6:
            break
        middle = (low + high) / 2
        low, high = (middle, high) if union_rate(middle) <= alpha else (low, middle)
    return thresholds(low), low


def build_profile(
    model_inputs: Arrays,
    model_outputs: list[np.ndarray],
    *,
    kind: str | None = None,
    window: int = 200,
    alpha: float = 0.01,
    seed: int = 0,
    fit_fraction: float = 0.5,
    calibration_windows: int = 2000,
) -> dict[str, Any]:
    """A JSON-serialisable reference profile of a model's inputs and outputs on reference data
    (held-out task data), with thresholds calibrated to false-alarm rate ``alpha`` per window."""
    if kind not in OUTPUT_TESTS:
        raise ParameterError(f"The 'kind' of a drift profile must be one of {', '.join(KINDS)} or None. Got {kind!r} instead.")
    if not isinstance(window, int) or window < MIN_PART:
        raise ParameterError(f"The drift 'window' must be an integer >= {MIN_PART}. Got {window!r} instead.")
    if not 0 < alpha < 0.5:
        raise ParameterError(f"The drift 'alpha' (false-alarm rate per window) must be in (0, 0.5). Got {alpha!r} instead.")
    if not 0.1 <= fit_fraction <= 0.9:
        raise ParameterError(f"The drift 'fit_fraction' must be in [0.1, 0.9]. Got {fit_fraction!r} instead.")
    if not isinstance(calibration_windows, int) or calibration_windows * alpha < 5:
        raise ParameterError(f"The drift 'calibration_windows' must be an integer >= 5 / alpha = {int(np.ceil(5 / alpha))}"
                             f" (so each quantile rests on 5 exceedances). Got {calibration_windows!r} instead.")
    if not model_inputs or not model_outputs:
        raise BadInputError("A drift profile needs the model's inputs and outputs on reference data; got none.")
    sizes = {len(v) for v in model_inputs.values()} | {len(v) for v in model_outputs}
    if len(sizes) != 1:
        raise BadInputError(f"Reference inputs and outputs disagree on the number of samples: {sorted(sizes)}.")
    total = sizes.pop()
    n_fit = round(total * fit_fraction)
    if min(n_fit, total - n_fit) < max(MIN_PART, window // 2):
        need = int(np.ceil(max(MIN_PART, window // 2) / min(fit_fraction, 1 - fit_fraction)))
        raise BadInputError(f"A drift profile with window {window} needs at least {need} reference samples; got "
                            f"{total}. Pass more reference data or a smaller window.")
    with one_blas_thread():
        return to_json(_fit_and_calibrate(model_inputs, model_outputs, kind, window, alpha, seed, n_fit,
                                          calibration_windows))


def _fit_and_calibrate(model_inputs: Arrays, model_outputs: list[np.ndarray], kind: str | None, window: int,
                       alpha: float, seed: int, n_fit: int, calibration_windows: int) -> dict[str, Any]:
    total = len(next(iter(model_inputs.values())))
    rng = np.random.default_rng(seed)
    order = rng.permutation(total)
    fit_idx, cal_idx = order[:n_fit], order[n_fit:]
    targets = [("ks", f"input:{name}") for name in model_inputs] + [(OUTPUT_TESTS[kind], "output:0")]
    tests: list[dict[str, Any]] = []
    calibration_rows: list[np.ndarray] = []
    for test_name, target in targets:
        test = drift_test(test_name)
        raw = test.raw(target, model_inputs, model_outputs)
        state = test.fit(raw[fit_idx], alpha)
        tests.append({"name": f"{test_name}:{target.partition(':')[2]}", "test": test_name, "target": target,
                      "state": state})
        calibration_rows.append(test.features(state, raw[cal_idx]))
    profile: dict[str, Any] = {"format": FORMAT, "kind": kind, "window": window, "alpha": alpha, "tests": tests}
    statistics = np.empty((calibration_windows, len(tests)))
    for b in range(calibration_windows):
        picks = rng.integers(0, len(cal_idx), window)
        scores = window_scores(profile, [rows[picks] for rows in calibration_rows])
        statistics[b] = [score for score, _ in scores]
    thresholds, level = calibrate(statistics, alpha)
    for spec, threshold in zip(tests, thresholds):
        spec["threshold"] = float(threshold)
    profile.update({
        "alpha_per_test": level,
        "calibration": {"seed": seed, "reference_samples": total, "fit_samples": n_fit,
                        "calibration_samples": len(cal_idx), "windows": calibration_windows,
                        "false_alarm_rate": float((statistics > thresholds).any(axis=1).mean())},
        "inputs": {name: {"dtype": str(np.asarray(v).dtype), "shape": list(np.asarray(v).shape[1:])}
                   for name, v in model_inputs.items()},
    })
    return profile
