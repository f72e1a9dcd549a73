"""optimize end to end on the real digits teacher, with a small real technique (see conftest)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from compactai.budget import parse_budget
from compactai.errors import BadInputError, BudgetNotMetError
from compactai.measure import MeasureConfig
from compactai.search import SearchConfig, default_space, optimize

ROOT = Path(__file__).resolve().parents[2]


def quick_config(**kwargs):
    return SearchConfig(measure=MeasureConfig.quick(), enqueue_singles=False, **kwargs)


def space():
    return default_space("cnn", "torch", ["test_round_weights"])


@pytest.fixture(scope="module")
def finished_run(digits, tmp_path_factory):
    """One real optimize run shared by the checks below (the search is the slow part)."""
    from compactai.techniques.base import TECHNIQUES, register_technique
    from tests.search.conftest import RoundWeights

    register_technique(RoundWeights)
    out = tmp_path_factory.mktemp("optimize") / "run"
    try:
        results = optimize(digits.handle, digits.task, parse_budget("size_mb<=100", "0.99"), out,
                           quick_config(max_trials=3), space=space(), source={"example": "digits"})
    finally:
        TECHNIQUES.unregister(RoundWeights.name)
    return out, results


def test_optimize_writes_model_results_and_report(finished_run):
    out, results = finished_run
    assert (out / "model.onnx").exists() and (out / "report.html").exists()
    data = json.loads((out / "results.json").read_text())
    assert len(data["trials"]) == 3 and data["chosen"] is not None
    for t in data["trials"]:
        assert t["status"] == "ok" and t["figures"]["latency_p90_ms"] > 0 and "recipe" in t
    chosen = data["chosen"]
    assert chosen["figures"]["quality_relative"] >= 0.99
    assert data["baseline"]["latency_queries"] >= 50
    for figures in (data["baseline"], chosen["figures"]):  # original and chosen re-timed in turn, medians reported
        assert figures["latency_rounds"] == 3 and len(figures["latency_rounds_ms"]) == 3
        assert figures["single_run_latency_p90_ms"] > 0 and figures["latency_p90_ms"] > 0
    assert data["waterfall"][0]["step"] == "original"
    assert set(data["selection"]["pareto_front"]) <= {t["number"] for t in data["trials"]}
    html = (out / "report.html").read_text()
    for element in ("pareto-plot", "waterfall-plot", "latency-plot", "comparison", "recipe"):
        assert f'id="{element}"' in html
    assert html.count("<svg") >= 3
    assert not re.search(r'(src|href)="(https?:)?//', html)  # self-contained: nothing fetched
    assert results["chosen"]["trial"] == chosen["trial"]


def test_existing_study_needs_resume(digits, round_technique, finished_run):
    out, _ = finished_run
    before = (out / "results.json").read_text()
    with pytest.raises(BadInputError, match="--resume"):
        optimize(digits.handle, digits.task, parse_budget("", "0.5"), out, quick_config(max_trials=2), space=space())
    assert (out / "results.json").read_text() == before  # earlier results intact


def test_impossible_budget_writes_closest_and_raises(digits, round_technique, tmp_path):
    out = tmp_path / "impossible"
    with pytest.raises(BudgetNotMetError, match=r"latency_p90_ms.*beyond the limit"):
        optimize(digits.handle, digits.task, parse_budget("latency_p90_ms<=0.0001", "0.99"), out,
                 quick_config(max_trials=1), space=space())
    data = json.loads((out / "results.json").read_text())
    assert data["chosen"] is None and data["selection"]["closest"]
    assert list((out / "candidates").glob("*/model.onnx"))
    assert (out / "report.html").exists() and (out / "model.onnx").exists()  # the closest, marked as such
    assert data["budget_met"] is False and data["closest"]["trial"] == data["selection"]["closest"][0]


def test_failed_trial_is_recorded_not_fatal(digits, round_technique, tmp_path):
    from compactai.search.space import SearchSpace, Stage

    bad = SearchSpace([Stage(["test_round_weights"], optional=False, fixed={"test_round_weights": {"bits": 3}})])  # 3 is outside its space
    out = tmp_path / "failing"
    with pytest.raises(BudgetNotMetError):
        optimize(digits.handle, digits.task, parse_budget("", "0.5"), out, quick_config(max_trials=1), space=bad)
    data = json.loads((out / "results.json").read_text())
    assert all(t["status"] == "failed" and "bits" in t["error"] for t in data["trials"])


RUNNER = textwrap.dedent("""
    import sys, pathlib
    sys.path.insert(0, {root!r})
    from tests.search.conftest import RoundWeights
    from compactai.techniques.base import register_technique
    import compactai.techniques.base as base

    class Logged(RoundWeights):
        name = "test_round_weights"
        def _apply(self, handle, context, params):
            with open({log!r}, "a") as f:
                f.write(repr(self.params) + "\\n")
            return super()._apply(handle, context, params)

    register_technique(Logged)
    import compactai
    from compactai.budget import parse_budget
    from compactai.measure import MeasureConfig
    from compactai.search import SearchConfig, default_space, optimize
    ex = compactai.load_example("digits")
    config = SearchConfig(max_trials={trials}, measure=MeasureConfig.quick(), enqueue_singles=False,
                          resume={resume}, executor={executor!r})
    optimize(ex.handle, ex.task, parse_budget("", "0.5"), pathlib.Path({out!r}), config,
             space=default_space("cnn", "torch", ["test_round_weights"]))
""")


RAY_RUNNER = textwrap.dedent("""
    import pathlib
    import compactai
    from compactai.budget import parse_budget
    from compactai.measure import MeasureConfig
    from compactai.search import SearchConfig, default_space, optimize
    ex = compactai.load_example("digits")
    config = SearchConfig(max_trials=3, measure=MeasureConfig.quick(), enqueue_singles=False, executor="ray")
    optimize(ex.handle, ex.task, parse_budget("", "0.5"), pathlib.Path({out!r}), config,
             space=default_space("cnn", "torch", ["test_round_weights"]))
""")


def _finished(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        try:
            return con.execute("select count(*) from trials where state in ('COMPLETE', 'FAIL')").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


@pytest.mark.slow
def test_killed_run_resumes_without_repeating_finished_trials(tmp_path):
    out, log = tmp_path / "killed", tmp_path / "applied.log"
    script = tmp_path / "run.py"
    script.write_text(RUNNER.format(root=str(ROOT), log=str(log), out=str(out), trials=6, resume=False,
                                    executor="local"))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path)
    deadline = time.monotonic() + 300
    while _finished(out / "study.db") < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = _finished(out / "study.db")
    assert 2 <= finished_before < 6
    with sqlite3.connect(out / "study.db") as con:
        before = dict(con.execute(
            "select t.number, a.value_json from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
            "where a.key = 'compactai_result' and t.state = 'COMPLETE'").fetchall())
        repeats = {number for (number,) in con.execute(
            "select t.number from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
            "where a.key = 'repeat_of'").fetchall()}  # a recipe proposed again: reused, not counted as a trial
    applied_before = len(log.read_text().splitlines()) if log.exists() else 0
    script.write_text(RUNNER.format(root=str(ROOT), log=str(log), out=str(out), trials=6, resume=True,
                                    executor="local"))
    subprocess.run([sys.executable, str(script)], cwd=tmp_path, check=True, timeout=600)
    data = json.loads((out / "results.json").read_text())
    numbers = [t["number"] for t in data["trials"]]
    ran = [json.dumps(t["recipe"], sort_keys=True) for t in data["trials"] if t["status"] == "ok"]
    # 6 trials (the one killed mid-way is recorded as failed), each finished recipe once; or fewer when
    # the sampler ran out of new recipes (the space is small)
    assert len(numbers) == len(set(numbers)) and len(ran) == len(set(ran))
    assert len(numbers) == 6 or data["search"]["stopped_by"] == "exhausted"
    with sqlite3.connect(out / "study.db") as con:
        after = dict(con.execute(
            "select t.number, a.value_json from trials t join trial_user_attributes a on a.trial_id = t.trial_id "
            "where a.key = 'compactai_result' and t.state = 'COMPLETE'").fetchall())
    for number, value in before.items():
        assert after[number] == value  # finished trials kept as they were, not re-run
    applied_after = len(log.read_text().splitlines())
    # the resumed run applied the technique at most once per new trial (identical recipes are reused)
    assert applied_after - applied_before <= 6 - len(set(before) - repeats)


@pytest.mark.slow
def test_ray_executor_same_result_format(tmp_path):
    pytest.importorskip("ray")
    out, _log = tmp_path / "ray", tmp_path / "applied.log"
    script = tmp_path / "run.py"
    script.write_text(RAY_RUNNER.format(out=str(out)))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "COMPACTAI_PLUGINS": "tests.search.ray_plugin",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    if proc.returncode != 0 and ("ray.init" in proc.stderr or "Failed to start" in proc.stderr):
        pytest.skip(f"Ray could not start here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    assert data["search"]["executor"] == "ray"
    assert len(data["trials"]) == 3 and all(t["status"] == "ok" for t in data["trials"])
    assert set(data["trials"][0]) >= {"number", "recipe", "status", "figures", "artifact", "lineage", "feasible"}
    assert (out / "model.onnx").exists()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(finished_run, tmp_path):
    browser = chromium()
    if browser is None:
        if os.environ.get("COMPACTAI_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required (COMPACTAI_REQUIRE_CHROMIUM is set) but not installed")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    out, _ = finished_run
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    url = (out / "report.html").as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for element in ("pareto-plot", "waterfall-plot", "latency-plot"):
        assert f'id="{element}"' in dom.stdout
    assert dom.stdout.count("<svg") >= 3
    assert "Uncaught" not in dom.stderr and "Failed to load resource" not in dom.stderr
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,2400", url],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000  # a rendered page with figures, not a blank one


def test_contenders_are_remeasured_interleaved_and_relative_budget_resolved_again(digits, tmp_path):
    from compactai.search.remeasure import interleaved_selection_figures
    from compactai.search.trial import TrialResult

    baseline = digits.handle.to_onnx(tmp_path / "baseline.onnx")
    figures = {"quality": 0.99, "quality_relative": 1.0, "latency_p50_ms": 50.0, "latency_p90_ms": 60.0, "size_mb": 1.0}
    recipe = [{"technique": "quantize", "params": {}}]
    fast = TrialResult(0, recipe, "ok", figures=dict(figures), artifact=str(baseline.path))
    poor = TrialResult(1, [], "ok", figures={**figures, "quality_relative": 0.5}, artifact=str(baseline.path))
    repeat = TrialResult(2, recipe, "ok", figures=dict(figures), artifact=str(baseline.path))
    requested = parse_budget("latency_p90_ms<=0.5x", "0.99")
    resolved = requested.resolve({"latency_p90_ms": 1000.0})
    seen = []
    budget, report = interleaved_selection_figures(
        lambda t: seen.append(t.number) or baseline, baseline, [fast, poor, repeat], requested, resolved,
        {"latency_p90_ms": 1000.0, "size_mb": 1.0}, MeasureConfig.quick(), rounds=3)
    assert seen == [0] and report["trials"] == [0]  # the low-quality trial is not a contender
    assert len(fast.figures["latency_rounds_ms"]) == 3 and fast.figures["search_latency_p90_ms"] == 60.0
    assert fast.figures["latency_p90_ms"] != 60.0 and poor.figures["latency_p90_ms"] == 60.0
    assert repeat.figures["latency_p90_ms"] == fast.figures["latency_p90_ms"]  # a repeated recipe: measured once
    assert repeat.figures["search_latency_p90_ms"] == 60.0 and repeat.feasible is False
    limit = budget.constraints[0].value  # 0.5x the original's p90 from the same rounds, not the 1000 ms given
    assert limit == pytest.approx(0.5 * report["baseline"]["latency_p90_ms"], rel=1e-5)
    assert fast.feasible is False  # the same model as the original cannot be within 0.5x of it
    none, nothing = interleaved_selection_figures(lambda t: baseline, baseline, [fast], requested, resolved, {},
                                                  MeasureConfig.quick(), rounds=0)
    assert none is resolved and nothing is None


def test_repeated_recipes_do_not_use_up_the_trial_budget(digits, round_technique, tmp_path):
    """The test space has 4 recipes (skip, or bits 2/4/8): asking for 6 gets the 4, then the
    search stops as exhausted instead of filling the budget with repeats."""
    results = optimize(digits.handle, digits.task, parse_budget("", "0.5"), tmp_path / "run",
                       quick_config(max_trials=6, remeasure_rounds=0), space=space())
    recipes = [json.dumps(t["recipe"], sort_keys=True) for t in results["trials"]]
    assert len(recipes) == len(set(recipes)) == 4
    assert results["search"]["stopped_by"] == "exhausted"
