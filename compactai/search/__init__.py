"""Budget-driven search across techniques (Optuna ask/tell), selection and the optimize job."""

from compactai.search.engine import SearchConfig, SearchOutcome, run_search
from compactai.search.optimize import optimize
from compactai.search.select import Selection, pareto_front, select
from compactai.search.space import SearchSpace, Stage, default_space
from compactai.search.trial import TrialResult

__all__ = ["SearchConfig", "SearchOutcome", "SearchSpace", "Selection", "Stage", "TrialResult", "default_space",
           "optimize", "pareto_front", "run_search", "select"]
