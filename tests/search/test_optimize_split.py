"""optimize with a stated network: results.json and the report say where to split the chosen model."""

from __future__ import annotations

import json

import pytest

from compactai.budget import parse_budget
from compactai.measure import MeasureConfig
from compactai.search import SearchConfig, default_space, optimize
from compactai.search.deployment import NetworkSpec

pytestmark = pytest.mark.slow


def test_results_and_report_name_the_cut_for_the_stated_network(digits, round_technique, tmp_path):
    # a 10 kbit/s uplink: even the 640-byte pooled features take half a second, so the device keeps the model
    network = NetworkSpec(bandwidth_mbps=0.01, rtt_ms=5.0, server_speedup=10.0, server_overhead_ms=1.5)
    config = SearchConfig(measure=MeasureConfig.quick(), enqueue_singles=False, max_trials=1, remeasure_rounds=0,
                          network=network)
    out = tmp_path / "run"
    results = optimize(digits.handle, digits.task, parse_budget("size_mb<=100", "0.9"), out, config,
                       space=default_space("cnn", "torch", ["test_round_weights"]))
    split = json.loads((out / "results.json").read_text())["split"]
    assert split == json.loads(json.dumps(results["split"]))
    assert split["network"]["bandwidth_mbps"] == 0.01 and split["network"]["server_overhead_ms"] == 1.5
    assert split["choice"]["kind"] == "all-local"
    kinds = [c["kind"] for c in split["cuts"]]
    assert kinds[0] == "all-remote" and kinds[-1] == "all-local" and "split" in kinds
    # the choice is the cheapest cut of the table at the stated bandwidth, and remote cuts carry the overhead
    at_stated = [c["end_to_end_ms"]["0.01"] for c in split["cuts"]]
    assert split["choice"]["end_to_end_ms"] == pytest.approx(min(at_stated))
    remote = split["cuts"][0]
    assert remote["end_to_end_ms"]["0.01"] == pytest.approx(
        remote["request_bytes"] * 8 / 0.01e6 * 1e3 + 5.0 + 1.5 + remote["tail_ms"] / 10.0)
    assert set(split["choice_by_bandwidth"]) == {"0.001", "0.01", "0.1"}
    html = (out / "report.html").read_text()
    assert 'id="split-choice"' in html and "all-local" in html


@pytest.mark.parametrize("args, message", [
    (["--bandwidth-mbps", "10"], "--bandwidth-mbps needs --rtt-ms"),
    (["--bandwidth-mbps", "0", "--rtt-ms", "5"], "--bandwidth-mbps must be a positive"),
    (["--rtt-ms", "5"], "give --bandwidth-mbps too"),
])
def test_network_options_are_checked_before_any_work(tmp_path, capsys, args, message):
    from compactai.cli import main

    code = main(["optimize", "--example", "digits", *args, "-o", str(tmp_path / "out")])
    assert code == 2
    assert message in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "out").exists()
