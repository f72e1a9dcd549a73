"""MLPerf scenarios: LoadGen's early-stopping arithmetic, the Poisson server's rate, and the
single-stream p50 against an independent timing of the same ONNX Runtime session."""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import pytest

from compactai.measure import make_runner
from compactai.measure.mlperf import (
    ScenarioSettings,
    early_stopping_estimate,
    min_passing_queries,
    offline,
    poisson_schedule,
    quality_verdict,
    server,
    server_early_stopping,
    single_stream,
    stack_samples,
)


def binomial_cdf(k: int, n: int, q: float) -> float:
    """P(X <= k), X ~ Binomial(n, q), summed by hand (independent of scipy)."""
    return sum(math.comb(n, x) * q**x * (1 - q) ** (n - x) for x in range(k + 1))


def test_min_passing_queries_matches_loadgen_reference_values():
    # values LoadGen prints: 459 queries for p99 with no overlatency query; the single-stream
    # floors "need to process at least 64 (p90) / 662 (p99) queries"
    assert min_passing_queries(0, 99) == 459
    assert min_passing_queries(1, 90) + 1 == 64
    assert min_passing_queries(1, 99) + 1 == 662
    # and the defining inequality at the boundary, by hand: 63 passing + 1 over is enough, 62 is not
    assert binomial_cdf(1, 64, 0.1) < 0.01 <= binomial_cdf(1, 63, 0.1)


def test_early_stopping_estimate_hand_computed_case():
    latencies = [float(x) for x in range(100, 0, -1)]  # 100 queries of 1..100 ms, any order
    # Hand computation (p90, confidence 0.99): t overlatency queries are allowed when the other
    # 100 - t queries reach min_passing_queries(t), i.e. P(Bin(100, 0.1) <= t) < 0.01.
    #   t = 3: P = 0.0078 < 0.01 -> allowed;  t = 4: P = 0.0237 >= 0.01 -> not allowed.
    assert binomial_cdf(3, 100, 0.1) == pytest.approx(0.00784, abs=1e-4)
    assert binomial_cdf(4, 100, 0.1) == pytest.approx(0.02371, abs=1e-4)
    # so t = 3 and the estimate is the 3rd-largest latency (0-based index 100 - 3 of the sorted list): 98 ms
    result = early_stopping_estimate(latencies, 90)
    assert result["overlatency_queries"] == 3
    assert result["estimate_ms"] == 98.0
    assert result["min_queries"] == 64
    too_few = early_stopping_estimate(latencies[:63], 90)
    assert too_few["estimate_ms"] is None and too_few["min_queries"] == 64


def test_server_early_stopping_counts_overlatency_queries():
    fast = [1.0] * 500
    assert server_early_stopping(fast, 2.0) == {"overlatency_queries": 0, "queries": 500, "min_queries": 459,
                                                "passed": True}
    slow = [1.0] * 495 + [5.0] * 5
    check = server_early_stopping(slow, 2.0)
    assert check["overlatency_queries"] == 5 and check["passed"] is False  # 5 over needs far more than 500


def test_poisson_schedule_offers_the_exact_rate_with_exponential_gaps():
    times = poisson_schedule(200.0, 20.0, seed=1)
    assert len(times) == 4000 and np.all(np.diff(times) >= 0) and times[0] >= 0 and times[-1] < 20.0
    gaps = np.diff(times)
    # exponential gaps: coefficient of variation 1 (a fixed-interval schedule would have 0)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.1)


def test_server_achieved_rate_within_5_percent_of_requested(small_onnx):
    from compactai import load_model

    handle = load_model(str(small_onnx))
    runner = make_runner(handle, "onnxruntime", threads=1)
    samples = [handle.example_inputs]
    run = server(runner, samples, rate=80.0, duration_s=4.0, bound_ms=1000.0, seed=3)
    assert run["queries"] == 320
    assert 0.95 <= run["achieved_ratio"] <= 1.05, run
    assert run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]


class SleepRunner:
    """A real runner whose every query takes a known 10 ms (a stand-in model with fixed service time)."""

    runtime = "sleep"
    threads = 1

    def run(self, feeds):
        time.sleep(0.01)
        return [np.zeros(1)]


def test_overloaded_server_falls_behind_and_misses_its_bound():
    run = server(SleepRunner(), [{}], rate=300.0, duration_s=1.0, bound_ms=50.0, seed=0)
    # capacity is at most 100 QPS: the achieved rate cannot reach 300 and queueing blows the p99
    assert run["achieved_ratio"] < 0.5 and run["meets_bound"] is False
    assert run["p99_ms"] > 1000.0  # the last queries waited behind ~200 others


@pytest.mark.quiet
def test_single_stream_p50_matches_independent_timing_of_the_same_session(digits, tmp_path):
    """Ratio only, in one run: many short interleaved rounds (who goes first alternates), all
    samples pooled, so load from other processes hits both timings alike. Needs a machine that
    is not saturated; on a heavily loaded one re-run it alone."""
    handle = digits.handle.to_onnx(tmp_path / "digits.onnx")
    runner = make_runner(handle, "onnxruntime", threads=1)
    feeds = {k: v[:1] for k, v in handle.example_inputs.items()}
    session, names = runner.session, [o.name for o in runner.session.get_outputs()]
    settings = ScenarioSettings(duration_s=0.01, min_queries=20, warmup=2, energy=False)
    bench_ms, direct_ms = [], []
    for round_number in range(25):
        for which in ((0, 1) if round_number % 2 == 0 else (1, 0)):
            if which == 0:
                bench_ms += single_stream(runner, [feeds], settings)["latencies_ms"]
            else:
                for _ in range(22):  # 2 warm-up queries, as single_stream's, then 20 timed
                    t0 = time.perf_counter()
                    session.run(names, feeds)
                    direct_ms.append((time.perf_counter() - t0) * 1e3)
                del direct_ms[-22:-20]
    ratio = statistics.median(bench_ms) / statistics.median(direct_ms)
    assert len(bench_ms) == len(direct_ms) == 500
    assert 0.9 <= ratio <= 1.1, (ratio, statistics.median(bench_ms), statistics.median(direct_ms))


def test_offline_stacks_variable_length_tokens_and_counts_samples(small_onnx):
    from compactai import load_model

    samples = [{"input_ids": np.ones((1, n), np.int64), "attention_mask": np.ones((1, n), np.int64)} for n in (3, 5)]
    batch = stack_samples(samples)
    assert batch["input_ids"].shape == (2, 5) and batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0]
    handle = load_model(str(small_onnx))
    runner = make_runner(handle, "onnxruntime", threads=1)
    row = handle.example_inputs
    run = offline(runner, [row], ScenarioSettings(duration_s=0.05, min_queries=64, offline_batch=16), stack_samples)
    assert run["samples"] >= 64 and run["samples"] % 16 == 0
    assert run["throughput_samples_per_s"] == pytest.approx(run["samples"] / run["seconds"])


def test_quality_verdict_follows_mlperfs_99_and_99_9_percent_rule():
    assert quality_verdict(0.995, 1.0) == {"value": 0.995, "reference": 1.0, "ratio": 0.995,
                                           "pass_99": True, "pass_99_9": False}
    assert quality_verdict(0.98, 1.0)["pass_99"] is False
    assert quality_verdict(0.9995, 1.0)["pass_99_9"] is True
