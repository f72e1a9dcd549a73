"""`optimize --runtime auto|NAME`: after the search, the chosen model and each runtime's own int8
are measured on every installed runtime and the runtime is part of the choice (real digits model,
real ONNX Runtime and OpenVINO, a one-trial search)."""

from __future__ import annotations

import json

import pytest

from compactai.budget import parse_budget
from compactai.measure import MeasureConfig, runtime_plugin
from compactai.search import SearchConfig, default_space, optimize
from compactai.search.runtime_stage import float_ancestor, quality_floor
from compactai.search.trial import TrialResult
from tests.cli.test_bad_input import refused, run_cli

needs_openvino = pytest.mark.skipif(not runtime_plugin("openvino").available(),
                                    reason="OpenVINO is not installed: pip install -c constraints.txt 'compactai[openvino]'")


def test_quality_floor_is_the_strictest_quality_limit():
    assert quality_floor(parse_budget("size_mb<=10", "0.99"), 0.5) == pytest.approx(0.495)
    assert quality_floor(parse_budget("size_mb<=10", "abs:0.7"), 0.5) == 0.7
    assert quality_floor(parse_budget("size_mb<=10"), 0.5) is None


def test_float_ancestor_is_the_trial_without_the_final_quantize_step(small_onnx, tmp_path):
    prune = {"technique": "structured_prune", "params": {"ratio": 0.5}}
    quantize = {"technique": "quantize", "params": {"mode": "static"}}
    original = object()

    def trial(number, recipe, artifact=None):
        return TrialResult(number, recipe, "ok", artifact=None if artifact is None else str(artifact))

    def load(result):
        return f"model of trial {result.number}"

    chosen = trial(3, [prune, quantize])
    assert float_ancestor(original, trial(1, [prune]), [], load)[0] is None  # no final quantize: itself
    assert float_ancestor(original, trial(2, [quantize]), [], load)[:3:2] == (original, [])
    # the prefix ran as a trial whose model is on disk: that model; without its file: the original
    assert float_ancestor(original, chosen, [trial(1, [prune], small_onnx), chosen], load)[::2] == (
        "model of trial 1", [prune])
    assert float_ancestor(original, chosen, [trial(1, [prune], tmp_path / "gone.onnx")], load)[0] is original
    assert float_ancestor(original, chosen, [trial(1, [prune, prune], small_onnx)], load)[0] is original


@needs_openvino
@pytest.mark.slow
def test_optimize_runtime_auto_measures_every_runtime_and_records_the_choice(digits, tmp_path):
    out = tmp_path / "run"
    space = default_space("cnn", "torch", ["quantize"],
                          overrides={"quantize": {"mode": "static", "per_channel": True, "calibration": "minmax"}})
    space.stages[0].optional = False  # the one trial quantizes: OpenVINO then meets ONNX Runtime's int8 ops
    config = SearchConfig(measure=MeasureConfig.quick(), enqueue_singles=False, max_trials=1, remeasure_rounds=2)
    results = optimize(digits.handle, digits.task, parse_budget("size_mb<=100", "0.98"), out, config, space=space,
                       source={"example": "digits"}, runtime="auto")
    saved = json.loads((out / "results.json").read_text())
    choice = saved["runtime_choice"]
    assert choice == json.loads(json.dumps(results["runtime_choice"]))
    rows = {row["label"]: row for row in choice["candidates"]}
    assert set(choice["runtimes"]) >= {"onnxruntime", "openvino"} and choice["measured_runtimes"][0] == "onnxruntime"
    assert {"onnxruntime", "openvino"} <= {row["runtime"] for row in rows.values()}
    # the search's own model on ONNX Runtime is measured, and OpenVINO's NNCF int8 of its float ancestor
    assert rows["onnxruntime optimize's model (int8)"]["error"] is None
    assert rows["openvino int8"]["made_by"] == "openvino convert int8" and rows["openvino int8"]["error"] is None
    assert choice["float_ancestor"].startswith("the original model")
    # a runtime that cannot read the chosen file is a row with its error, not a crash (or it ran and was measured)
    assert rows["openvino optimize's model (int8)"]["error"] or rows["openvino optimize's model (int8)"]["latency_p50_ms"]
    measured = [row for row in rows.values() if not row["error"]]
    for row in measured:
        assert row["latency_p50_ms"] > 0 and len(row["rounds_ms"]) == 2 and row["quality_validation"] is not None
    floor = choice["quality_floor_validation"]
    assert floor == pytest.approx(0.98 * saved["task"]["baseline_selection"])
    # the winner meets the floor and the size limit and is the fastest at batch 1 of those that do
    winner = rows[choice["winner"]["label"]]
    assert winner["quality_validation"] >= floor and winner["size_bytes"] / 1e6 <= 100 and winner["meets_budget"]
    eligible = [r for r in measured if r["quality_validation"] >= floor - 1e-12 and r["size_bytes"] / 1e6 <= 100]
    assert all(r["meets_budget"] and not r["budget_misses"] for r in eligible)
    assert winner["latency_p50_ms"] == min(r["latency_p50_ms"] for r in eligible)
    # the recipe records the runtime: the winner's ends with its runtime step, model.onnx's with ONNX Runtime's
    assert choice["winner"]["recipe"][-1] == {"technique": "runtime", "params": {
        "runtime": winner["runtime"], "precision": winner["precision"], "made_by": winner["made_by"]}}
    assert saved["recipe"][-1]["technique"] == "runtime" and saved["recipe"][-1]["params"]["runtime"] == "onnxruntime"
    assert saved["chosen"]["lineage"][-1]["decisions"]["winner"] == winner["label"]
    assert saved["recipe"][:-1] == saved["trials"][saved["chosen"]["trial"] - 1]["recipe"]
    written = out / choice["winner"]["path"]
    assert written.is_file() and (out / "model.onnx").is_file()
    beside = json.loads((written.parent / "results.json").read_text())["recipe"]
    assert [s["technique"] for s in beside] == [s["technique"] for s in choice["winner"]["recipe"]]
    assert beside[-1] == choice["winner"]["recipe"][-1]
    html = (out / "report.html").read_text()
    assert 'id="runtime-choice"' in html and "<th>runtime</th>" in html and winner["label"] in html


def test_optimize_refuses_an_unknown_runtime_with_exit_2(tmp_path):
    line = refused(run_cli("optimize", "--example", "digits", "--runtime", "nosuch", "-o", str(tmp_path / "out")))
    assert "nosuch" in line and "openvino" in line
    assert not (tmp_path / "out").exists()
