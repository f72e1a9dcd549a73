from __future__ import annotations

from compactai.budget import parse_budget
from compactai.search.select import pareto_front, select
from compactai.search.trial import TrialResult


def trial(number, quality, latency, size, status="ok"):
    return TrialResult(number, [], status, figures={"quality": quality, "quality_relative": quality,
                                                    "latency_p90_ms": latency, "size_mb": size})


def test_pareto_front_drops_dominated():
    results = [trial(0, 0.99, 2.0, 4.0), trial(1, 0.98, 1.0, 1.0), trial(2, 0.97, 1.5, 2.0), trial(3, 0, 0, 0, "failed")]
    assert [r.number for r in pareto_front(results)] == [0, 1]


def test_select_best_quality_within_budget_ties_by_latency():
    budget = parse_budget("latency_p90_ms<=1.8", "0.975")
    results = [trial(0, 0.99, 2.0, 4.0), trial(1, 0.98, 1.0, 1.0), trial(2, 0.98, 0.9, 1.0), trial(3, 0.97, 0.5, 1.0)]
    chosen = select(results, budget).chosen
    assert chosen is not None and chosen.number == 2


def test_nothing_fits_names_the_failed_constraint():
    budget = parse_budget("latency_p90_ms<=0.1", "0.99")
    selection = select([trial(0, 0.99, 2.0, 4.0), trial(1, 0.95, 0.5, 1.0), trial(2, 0.99, 1.0, 4.0)], budget)
    assert selection.chosen is None
    # those that keep the quality floor come first (nearest first), then the one that lost quality
    assert [r.number for r in selection.closest] == [2, 0, 1]
    text = selection.explain(budget)
    assert "latency_p90_ms" in text and "beyond the limit" in text


def test_a_collapsed_model_is_never_the_closest_while_one_keeps_quality():
    # a pruned CNN that collapsed (quality 0) is smaller and faster than every int8 trial
    budget = parse_budget("latency_p90_ms<=0.1,size_mb<=0.04", "0.99")
    selection = select([trial(0, 0.0, 0.2, 0.05), trial(1, 1.0, 0.22, 0.07)], budget)
    assert [r.number for r in selection.closest] == [1, 0]


def test_contenders_are_the_trials_that_only_latency_could_rule_out():
    from compactai.search.remeasure import contenders

    budget = parse_budget("latency_p90_ms<=1.0,size_mb<=3", "0.98")
    results = [trial(0, 0.99, 2.0, 4.0), trial(1, 0.985, 1.5, 1.0), trial(2, 0.97, 0.5, 1.0),
               trial(3, 0.99, 1.2, 2.0), trial(4, 0.99, 0.1, 1.0, "failed")]
    for r in results:
        r.artifact = f"trials/{r.number}/model.onnx"
        r.recipe = [{"technique": "prune", "params": {"ratio": r.number / 10}}]
    assert [r.number for r in contenders(results, budget, limit=5)] == [3, 1]  # fastest first
    assert [r.number for r in contenders(results, budget, limit=1)] == [3]
    again = trial(5, 0.99, 1.2, 2.0)  # the sampler proposed trial 3's recipe again: one model, measured once
    again.recipe, again.artifact = results[3].recipe, "trials/5/model.onnx"
    assert [r.number for r in contenders([*results, again], budget, limit=5)] == [3, 1]
