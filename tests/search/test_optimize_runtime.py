"""`optimize --runtime auto|NAME`: after the search, the chosen model and each runtime's own int8
are measured on every installed runtime and the runtime is part of the choice (real digits model,
real ONNX Runtime and OpenVINO, a one-trial search)."""

from __future__ import annotations

import json
from html import unescape

import numpy as np
import pytest

from compactai.budget import parse_budget
from compactai.measure import MeasureConfig, make_runner, runtime_plugin
from compactai.search import SearchConfig, default_space, optimize
from compactai.search.runtime_stage import choose_runtime_after_search, float_ancestor, quality_floor
from compactai.search.trial import TrialResult
from compactai.tasks import Split, Task, fidelity_metric
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
def test_a_named_runtime_is_chosen_against_the_budget_with_onnx_runtime_as_reference(small_handle, tmp_path):
    quick = MeasureConfig(min_queries=5, min_seconds=0.02, warmup=1, throughput_batch=4, throughput_min_batches=1,
                          memory=False, energy=False, threads=1)
    name = small_handle.input_names[0]
    reference = make_runner(small_handle, "onnxruntime", threads=1).run
    rng = np.random.default_rng(0)
    splits = {split: Split({name: rng.standard_normal((24, 1, 16, 16)).astype(np.float32)})
              for split in ("calibration", "validation", "test")}
    task = Task("random-images", fidelity_metric(reference, "logits"), splits)
    chosen_handle = small_handle.to_onnx(tmp_path / "chosen.onnx")
    chosen = TrialResult(0, [], "ok", artifact=str(chosen_handle.path))

    def choose(budget, out):
        return choose_runtime_after_search(small_handle, chosen_handle, chosen, [chosen], lambda t: chosen_handle,
                                           task, parse_budget(budget, "0.5"), ["openvino"], out, quick,
                                           selection_baseline=1.0, rounds=2)

    section, winner, ort_row = choose("size_mb<=100", tmp_path / "out")
    assert section["measured_runtimes"] == ["onnxruntime", "openvino"]
    rows = {row["label"]: row for row in section["candidates"]}
    assert rows["onnxruntime optimize's model (float)"]["contender"] is False and ort_row is not None
    assert winner is not None and winner.runtime == "openvino" and section["winner"]["runtime"] == "openvino"
    assert (tmp_path / "out" / section["winner"]["path"]).is_file()
    # a size limit no file meets: every row says so, nothing is chosen and nothing is written
    section, winner, _ = choose("size_mb<=0.0001", tmp_path / "small")
    assert winner is None and section["winner"] is None and "model.onnx" in section["note"]
    assert all(row["budget_misses"] and "size_mb" in row["budget_misses"][0]
               for row in section["candidates"] if not row["error"])
    assert not (tmp_path / "small" / "openvino").exists()


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
    assert 'id="runtime-choice"' in html and "<th>runtime</th>" in html
    assert winner["label"] in unescape(html)  # labels carry an apostrophe, which the report escapes


def test_optimize_refuses_an_unknown_runtime_with_exit_2(tmp_path):
    line = refused(run_cli("optimize", "--example", "digits", "--runtime", "nosuch", "-o", str(tmp_path / "out")))
    assert "nosuch" in line and "openvino" in line
    assert not (tmp_path / "out").exists()
