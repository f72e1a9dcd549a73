"""The study bookkeeping of the search engine, on a real SQLite Optuna study."""

from __future__ import annotations

import json

from compactai.search.engine import RESULT_ATTR, SearchConfig, _fail_abandoned, finished_results, open_study
from compactai.search.trial import TrialResult


def test_trials_left_running_by_a_stopped_run_are_failed_and_reported(tmp_path):
    import optuna

    study = open_study(tmp_path, SearchConfig())
    done = study.ask({"bits": optuna.distributions.CategoricalDistribution([4, 8])})
    record = TrialResult(done.number, [{"technique": "t", "params": {}}], "ok", figures={"quality": 1.0})
    done.set_user_attr(RESULT_ATTR, json.dumps(record.to_dict()))
    study.tell(done, [1.0, 1.0, 1.0])
    study.ask({"bits": optuna.distributions.CategoricalDistribution([4, 8])})  # the run stops here

    resumed = open_study(tmp_path, SearchConfig(resume=True))  # a new process opening the same study
    assert _fail_abandoned(resumed) == 1 and _fail_abandoned(resumed) == 0
    results = finished_results(resumed)
    assert [(r.number, r.status) for r in results] == [(0, "ok"), (1, "failed")]
    assert results[1].error.startswith("interrupted: the run was stopped during this trial")
    assert "'bits'" in results[1].error  # the parameters it was running with
    states = [t.state.name for t in resumed.get_trials(deepcopy=False)]
    assert states == ["COMPLETE", "FAIL"]
