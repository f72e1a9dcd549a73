"""Multi-fidelity scheduling in the optimizer (issue 21): training trials run in rungs of epochs,
the promising ones continued from their checkpoint, the rest recorded ``pruned`` (not failed); and
NAS as a technique family the optimizer searches (a tiny seeded BERT teacher, real training)."""

from __future__ import annotations

import json

import pytest

from compactai.budget import parse_budget
from compactai.errors import ParameterError
from compactai.measure import MeasureConfig
from compactai.search import SearchConfig
from compactai.search.engine import run_search
from compactai.search.fidelity import FidelityConfig, Schedule, rungs_for, schedule_table
from compactai.search.space import SearchSpace, Stage, space_for_model
from compactai.search.trial import TrialResult
from compactai.tasks import Task
from compactai.techniques.base import ChoiceParam
from tests.techniques.test_nas_encoder import _task as encoder_task
from tests.techniques.test_nas_encoder import tiny_bert


def test_rungs_follow_the_training_steps_epochs_and_untrained_recipes_run_once():
    config = FidelityConfig(min_epochs=1, reduction_factor=3)
    distill = {"technique": "distill", "params": {"epochs": 6}}
    quantize = {"technique": "quantize", "params": {"mode": "dynamic"}}
    assert rungs_for([distill, quantize], config) == [1, 3, 6]
    assert rungs_for([{"technique": "nas", "params": {"epochs": 9}}], config) == [1, 3, 9]
    assert rungs_for([{"technique": "distill", "params": {}}], config) == [1, 3, 9, 10]  # the technique's default
    assert rungs_for([quantize], config) == [None]
    prune = {"technique": "structured_prune", "params": {"ratio": 0.3, "finetune_epochs": 3}}
    assert rungs_for([prune, quantize], config) == [1, 3]  # pruning's fine-tune is trained in rungs too
    assert rungs_for([{**prune, "params": {"finetune_epochs": 0}}, quantize], config) == [None]
    assert rungs_for([distill], FidelityConfig(enabled=False)) == [None]
    assert rungs_for([{"technique": "distill", "params": {"epochs": 1}}], config) == [None]
    with pytest.raises(ParameterError, match="reduction-factor"):
        FidelityConfig(reduction_factor=1).check()
    with pytest.raises(ParameterError, match="min-epochs"):
        FidelityConfig(min_epochs=0).check()


def _result(number: int, quality: float, latency: float) -> TrialResult:
    return TrialResult(number, [], "ok", figures={"quality": quality, "latency_p90_ms": latency})


def test_schedule_continues_the_best_third_at_each_rung_and_never_a_candidate_too_slow_to_fit():
    schedule = Schedule(FidelityConfig(reduction_factor=3), parse_budget("latency_p90_ms<=10"))
    decisions = [schedule.promote(schedule.record(_result(i, q, 5.0), 1)) for i, q in enumerate([0.5, 0.4, 0.6])]
    assert decisions == [True, False, True]  # the first ones continue while they are the best so far
    assert not schedule.promote(schedule.record(_result(3, 0.55, 5.0), 1))  # 4 values: the best 1 continues
    assert schedule.promote(schedule.record(_result(4, 0.7, 5.0), 1))
    # more epochs cannot make a model faster: a candidate 20% over the latency limit stops, and does not compete
    entry = schedule.record(_result(5, 0.99, 12.0), 1)
    assert not entry["competes"] and not schedule.promote(entry) and len(schedule.values[1]) == 5
    assert schedule.record(_result(6, 0.99, 11.0), 1)["competes"]  # within the margin for noise
    rebuilt = Schedule.from_results(schedule.config, schedule.budget, [TrialResult(
        0, [], "pruned", fidelity={"history": [{"epochs": 1, "quality": 0.5, "competes": True}]})])
    assert rebuilt.values == {1: [0.5]}


@pytest.fixture(scope="module")
def tiny_bert_task():
    """The tiny BERT of the encoder-NAS tests and a random-token task with 64 training rows."""
    handle = tiny_bert()
    return handle, encoder_task(handle, n=64)


def test_nas_is_searched_as_a_family_sharing_distillations_stage(tiny_bert_task):
    handle, task = tiny_bert_task
    space = space_for_model(handle, task)
    stage = next(s for s in space.stages if "nas" in s.techniques)
    assert set(stage.techniques) == {"distill", "nas"}  # one stage: a recipe never runs both
    nas = stage.search["nas"]
    # students smaller than the teacher (4 layers, 4 heads, FFN 64): fewer layers, heads that divide hidden 32
    assert all(v < 4 for v in nas["layers"].choices) and all(32 % h == 0 and h <= 4 for h in nas["heads"].choices)
    assert all(v <= 64 for v in nas["ffn"].choices)


@pytest.mark.slow
def test_optimizer_trains_nas_candidates_in_rungs_continuing_from_checkpoints(tiny_bert_task, tmp_path):
    handle, task = tiny_bert_task
    fixed = {"epochs": 3, "lr": 3e-3, "batch_size": 16, "max_minutes": 5.0}
    space = SearchSpace([Stage(["nas"], optional=False, fixed={"nas": fixed}, search={"nas": {
        "layers": ChoiceParam((1, 2, 3), 1), "heads": ChoiceParam((2, 4), 2), "ffn": ChoiceParam((16, 32), 16),
        "init": ChoiceParam(("spread", "first"), "spread")}})])
    measure = MeasureConfig(min_queries=10, min_seconds=0.01, warmup=2, throughput_batch=4, throughput_min_batches=1,
                            memory=False, energy=False, threads=1)
    config = SearchConfig(max_trials=5, seed=0, measure=measure, enqueue_singles=False, remeasure_rounds=0,
                          fidelity=FidelityConfig(min_epochs=1, reduction_factor=3))
    out = tmp_path / "run"
    out.mkdir()
    lines: list[str] = []
    outcome = run_search(handle, task, parse_budget("size_mb<=100", "abs:0.0"), space, out, config,
                         progress=lines.append)
    trials = outcome.trials
    assert len(trials) == 5 and not [t.error for t in trials if t.status == "failed"]
    statuses = [t.status for t in trials]
    assert "pruned" in statuses and "ok" in statuses  # a stopped candidate is pruned, never failed
    for trial in trials:
        history = trial.fidelity["history"]
        assert trial.fidelity["rungs"] == [1, 3] and history[0]["epochs"] == 1
        if trial.status == "pruned":
            assert [e["epochs"] for e in history] == [1] and history[0]["decision"] == "pruned"
    continued = [t for t in trials if len(t.fidelity["history"]) == 2]
    assert continued, statuses
    for trial in continued:
        # the second rung resumed the first rung's checkpoint: one schedule over epochs 1..3, not a new run
        decisions = trial.lineage[-1]["decisions"]
        assert decisions["resumed_from_step"] and decisions["resumed_from_step"] > 0 and decisions["epochs_run"] == 3
        assert trial.fidelity["decision"] == "completed" and trial.status == "ok"
        assert history_epochs(trial) == [1.0, 2.0, 3.0]
    assert schedule_table(trials) == [{"epochs": 1, "candidates": 5}, {"epochs": 3, "candidates": len(continued)}]
    assert any("continued to 3 epochs" in line for line in lines)
    # Optuna knows a pruned candidate as PRUNED, with its result kept
    import optuna

    study = optuna.load_study(study_name="compactai", storage=outcome.storage)
    states = {t.number: t.state.name for t in study.trials}
    assert all(states[t.number] == ("PRUNED" if t.status == "pruned" else "COMPLETE") for t in trials)
    stored = json.loads(study.trials[trials[0].number].user_attrs["compactai_result"])
    assert stored["fidelity"]["rungs"] == [1, 3]


def history_epochs(trial: TrialResult) -> list[float]:
    return [float(h["epoch"]) for h in trial.lineage[-1]["decisions"]["history"]]


def test_quality_figure_switches_the_headline_figure_and_bad_values_exit_2(tiny_bert_task, tmp_path):
    from tests.cli.test_bad_input import refused, run_cli

    handle, task = tiny_bert_task
    mean = task.scored_by("cosine_mean")
    assert mean.metric.primary == "cosine_mean" and task.metric.primary == "cosine_min"  # a new task
    quality = mean.evaluate(lambda feeds: [handle.run_torch(feeds)[0] * 0 + handle.run_torch(feeds)[0]])
    assert quality.value == pytest.approx(quality.details["cosine_mean"])
    from compactai.tasks import Accuracy

    with pytest.raises(ParameterError, match="only one figure"):
        Task("t", Accuracy(), task.splits).scored_by("cosine_mean")
    line = refused(run_cli("optimize", "--example", "digits", "--quality-figure", "cosine_avg",
                           "-o", str(tmp_path / "out")))
    assert "cosine_avg" in line and "cosine_mean" in line and not (tmp_path / "out").exists()
    line = refused(run_cli("optimize", "--example", "digits", "--reduction-factor", "1", "-o", str(tmp_path / "o2")))
    assert "--reduction-factor" in line
