"""`compactai bench` end to end in a subprocess: on a signed bundle directory with the digits
task, every scenario, --json, the results file, and bad input refused with exit 2."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_bad_input import _data, _mlp_onnx, refused, run_cli

QUICK = ["--duration", "0.3", "--min-queries", "70", "--search-steps", "2", "--search-duration", "0.3"]


@pytest.mark.slow
def test_bench_runs_every_scenario_on_a_bundle_with_the_digits_task(tmp_path, digits):
    from compactai.bundle import build_bundle, generate_keypair, load_private_key

    private, public = generate_keypair(tmp_path / "keys")
    model = digits.handle.to_onnx(tmp_path / "digits.onnx").path
    build_bundle(model, tmp_path / "bundle-v3", load_private_key(private), 3)
    results = tmp_path / "bench" / "digits.json"
    run = run_cli("bench", str(tmp_path / "bundle-v3"), "--example", "digits", "--trusted-key", str(public),
                  *QUICK, "-o", str(results), "--json", timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(run.stdout)
    assert data["source"]["bundle"]["verified"] is True and data["source"]["bundle"]["version"] == 3
    assert set(data["scenarios"]) == {"single-stream", "offline", "server"}
    single = data["scenarios"]["single-stream"]
    assert single["queries"] >= 70 and single["early_stopping_p90"]["estimate_ms"] >= single["p50_ms"]
    assert data["scenarios"]["offline"]["throughput_samples_per_s"] > 0
    server = data["scenarios"]["server"]
    assert server["queries"] >= 2 and len(server["search"]["steps"]) == 2
    assert data["mlperf_minimums"]["single-stream"] == {"min_duration_s": 600, "min_queries": 1024, "percentile": 90}
    # the bundle holds the same fp32 model as the reference: quality is 100% of it
    assert data["quality"]["mlperf"]["ratio"] == 1.0 and data["quality"]["mlperf"]["pass_99_9"] is True
    roof = data["roofline"]
    assert roof["precision"] == "fp32" and roof["fraction_of_peak"] > 0
    # a VM's /proc/cpuinfo clock can be below the boost clock the cores run at: then it says so
    assert (roof["caveat"] is None) == (roof["fraction_of_peak"] <= 1)
    assert json.loads(results.read_text())["scenarios"]["single-stream"]["p50_ms"] == single["p50_ms"]
    assert "MLPerf minimum" in run.stderr and "not an MLPerf submission" in run.stderr


def test_bench_on_an_onnx_file_with_data_and_one_scenario(tmp_path):
    model, data = _mlp_onnx(tmp_path / "mlp.onnx"), _data(tmp_path / "data.npz")
    run = run_cli("bench", str(model), "--data", str(data), "--scenario", "single-stream", *QUICK, "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert list(result["scenarios"]) == ["single-stream"] and result["query_samples"] == 24  # the test split's rows
    assert result["quality"]["metric"] == "accuracy" and result["quality"]["mlperf"]["pass_99"] is True


def test_bench_refuses_bad_input_with_exit_2(tmp_path):
    model = _mlp_onnx(tmp_path / "mlp.onnx")
    assert "scenario" in refused(run_cli("bench", str(model), "--scenario", "batch"))
    assert "--target-qps" in refused(run_cli("bench", str(model), "--target-qps", "-3"))
    assert "Not found" in refused(run_cli("bench", str(tmp_path / "missing.onnx")))
    assert "PATH" in refused(run_cli("bench"))
