"""The cloud-vs-local decision on fixed figures and assumptions, checked against arithmetic done
by hand, and the report rendered by `compactai report --decision` in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from compactai.errors import BadInputError, ParameterError
from compactai.report.decision import Assumptions, decide, load_assumptions
from tests.cli.test_bad_input import refused, run_cli

ORIGINAL = {"latency_p90_ms": 20.0, "throughput_items_per_s": 100.0, "energy_mj": 50.0, "energy_method": "estimated",
            "quality": 0.99, "size_mb": 4.0}
COMPRESSED = {"latency_p90_ms": 5.0, "throughput_items_per_s": 400.0, "energy_mj": 10.0, "energy_method": "estimated",
              "quality": 0.985, "size_mb": 1.0}
STATED = {"requests_per_day": 8_640_000, "peak_to_mean": 3, "network_rtt_ms": 40, "upload_mbps": 8,
          "payload_bytes": 10_000, "response_bytes": 100_000, "cloud_price_per_hour": 0.5, "cloud_speedup": 2,
          "cloud_utilization": 0.5, "cloud_instance_watts": 150, "egress_price_per_gb": 0.1,
          "local_hardware_price": 3600, "local_lifetime_months": 36, "local_power_watts": 100,
          "electricity_price_per_kwh": 0.2}


def test_decision_arithmetic_matches_the_hand_computation():
    result = decide(ORIGINAL, COMPRESSED, Assumptions(**STATED))
    cloud, local_original, local_compressed = result["sides"]
    # 8,640,000/day = 100 QPS mean, x3 peak = 300 QPS; a month is 8,640,000 x 365/12 = 262,800,000 requests
    assert result["peak_qps"] == pytest.approx(300.0)
    assert result["requests_per_month"] == pytest.approx(262_800_000)
    # cloud latency: RTT 40 + upload 10,000 B x 8 / 8 Mbit/s = 10 ms + compute 20 ms / speedup 2 = 10 ms -> 60 ms
    assert cloud["latency_p90_ms"] == pytest.approx(60.0)
    assert local_compressed["latency_p90_ms"] == 5.0 and local_original["latency_p90_ms"] == 20.0
    # cloud instance: 100/s x 2 = 200/s, at 50% utilization 100/s -> ceil(300/100) = 3 instances
    assert (cloud["units"], cloud["available_qps"]) == (3, pytest.approx(600.0))
    # cloud month: 3 x 0.5 USD/h x 730 h = 1095 + egress 262.8M x 100 kB = 26,280 GB x 0.1 = 2628 -> 3723 USD
    assert cloud["cost_per_month"] == pytest.approx(3723.0)
    assert cloud["cost_per_million"] == pytest.approx(3723.0 / 262.8)
    # one local machine a month: 3600/36 = 100 USD + 100 W x 730 h = 73 kWh x 0.2 = 14.6 -> 114.6 USD
    assert (local_original["units"], local_original["cost_per_month"]) == (3, pytest.approx(343.8))
    assert (local_compressed["units"], local_compressed["cost_per_month"]) == (1, pytest.approx(114.6))
    assert local_compressed["cost_per_million"] == pytest.approx(114.6 / 262.8)
    assert local_compressed["needed_qps"] == pytest.approx(300.0) and local_compressed["available_qps"] == 400.0
    # energy: cloud 150 W / 200 per s = 0.75 J; local is the measured (estimated) figure
    assert cloud["energy_mj"] == pytest.approx(750.0) and cloud["energy_method"] == "estimated"
    assert local_compressed["energy_mj"] == 10.0
    # break-even: 114.6 USD / (0.5 / (200 x 0.5 x 3600) + 1e-5 USD egress) per request
    per_request = 0.5 / 360_000 + 1e-5
    assert result["break_even"]["requests_per_month"] == pytest.approx(114.6 / per_request)
    assert result["break_even"]["requests_per_day"] == pytest.approx(114.6 / per_request / (365 / 12))
    assert result["cheapest"] == "local:compressed"
    assert "leaves" in cloud["data_leaving_device"] or "goes to the cloud" in cloud["data_leaving_device"]
    assert "no inference data leaves" in local_compressed["data_leaving_device"]
    assert "signed" in local_compressed["update_path"] and "TUF" in local_compressed["update_path"]


def test_stated_cloud_throughput_overrides_the_measured_one():
    result = decide(ORIGINAL, COMPRESSED, Assumptions(**{**STATED, "cloud_throughput_per_s": 1000.0}))
    assert result["sides"][0]["units"] == 1  # ceil(300 / (1000 x 0.5))


def test_assumptions_file_is_checked(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"requests_per_day": 10}))
    assert load_assumptions(path).requests_per_day == 10 and load_assumptions(path).network_rtt_ms == 40.0
    path.write_text(json.dumps({"requests_per_dya": 10}))
    with pytest.raises(BadInputError, match="requests_per_dya"):
        load_assumptions(path)
    path.write_text(json.dumps({"cloud_utilization": 2}))
    with pytest.raises(ParameterError, match="cloud_utilization"):
        load_assumptions(path)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _results_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    measured = {"onnxruntime": {**COMPRESSED, "quality": {"value": 0.985}, "macs": 1_000_000, "threads": 1}}
    baseline = {"onnxruntime": {**ORIGINAL, "quality": {"value": 0.99}}}
    (out / "results.json").write_text(json.dumps({"model": {"name": "toy"}, "baseline": baseline,
                                                  "measurements": measured, "recipe": []}))
    (tmp_path / "assumptions.json").write_text(json.dumps(STATED))
    return out


def test_report_command_writes_json_and_refuses_bad_input(tmp_path):
    out = _results_dir(tmp_path)
    run = run_cli("report", "--decision", str(out), "--assumptions", str(tmp_path / "assumptions.json"),
                  "-o", str(tmp_path / "decision"), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(run.stdout)
    assert data["sides"][0]["cost_per_month"] == pytest.approx(3723.0)
    assert json.loads((tmp_path / "decision" / "decision.json").read_text())["cheapest"] == "local:compressed"
    assert "% of this CPU's fp32 peak" in data["roofline"]
    assert "Not found" in refused(run_cli("report", "--decision", str(tmp_path / "nothing")))
    (tmp_path / "bad.json").write_text(json.dumps({"nope": 1}))
    assert "unknown assumption" in refused(run_cli("report", "--decision", str(out), "-a", str(tmp_path / "bad.json"),
                                                   "-o", str(tmp_path / "d2")))


@pytest.mark.slow
def test_decision_report_renders_in_headless_chromium(tmp_path):
    browser = chromium()
    if browser is None:
        if os.environ.get("COMPACTAI_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required (COMPACTAI_REQUIRE_CHROMIUM is set) but not installed")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    out = _results_dir(tmp_path)
    run = run_cli("report", "--decision", str(out), "-a", str(tmp_path / "assumptions.json"), "-o", str(tmp_path / "d"))
    assert run.returncode == 0, run.stderr[-3000:]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    url = (tmp_path / "d" / "decision.html").as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for element in ("verdict", "sides", "formulas", "break-even", "assumptions", "roofline"):
        assert f'id="{element}"' in dom.stdout
    assert "3,723" in dom.stdout and "114.6" in dom.stdout  # the hand-checked monthly costs, as rendered
    assert "local:compressed" in dom.stdout
    assert "Uncaught" not in dom.stderr and "Failed to load resource" not in dom.stderr
    shot = tmp_path / "decision.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,1600", url],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000  # a rendered page with tables, not a blank one


def test_report_reads_the_figures_a_bundle_carries(tmp_path, small_onnx):
    from compactai.bundle import build_bundle, generate_keypair, load_private_key

    out = _results_dir(tmp_path)
    shutil.copyfile(small_onnx, out / "model.onnx")
    private, _ = generate_keypair(tmp_path / "keys")
    build_bundle(out, tmp_path / "bundle", load_private_key(private), 1)
    run = run_cli("report", "--decision", str(tmp_path / "bundle"), "-a", str(tmp_path / "assumptions.json"),
                  "-o", str(tmp_path / "d"), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    data = json.loads(run.stdout)
    assert data["figures_source"].startswith("bundle ")
    assert [side["cost_per_month"] for side in data["sides"]] == pytest.approx([3723.0, 343.8, 114.6])
