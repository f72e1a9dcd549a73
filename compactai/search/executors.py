"""Where trials run: in this process (default) or as Ray tasks on a Ray cluster.

Both executors call the same ``run_trial``; Ray only changes where. On Ray each task asks
for as many CPUs as the measurement uses threads, so trials on one node never share cores
while being timed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from compactai.budget import Budget
from compactai.errors import BadInputError, MissingDependencyError
from compactai.models.handle import ModelHandle
from compactai.search.trial import StepCache, TrialResult, run_trial
from compactai.tasks import Task

Job = tuple[int, list[dict[str, Any]], int | None]  # (trial number, recipe, stop_epoch of its training steps)


class Executor(Protocol):
    parallel: int

    def run(self, number: int, recipe: list[dict[str, Any]], deadline: float | None,
            stop_epoch: int | None = None) -> TrialResult: ...

    def run_many(self, jobs: list[Job], deadline: float | None) -> list[TrialResult]: ...

    def close(self) -> None: ...


class LocalExecutor:
    def __init__(self, config: Any, handle: ModelHandle, task: Task, budget: Budget, out_dir: Path,
                 selection_baseline: float | None) -> None:
        self.config, self.handle, self.task, self.budget, self.out_dir = config, handle, task, budget, out_dir
        self.selection_baseline = selection_baseline
        self.cache = StepCache()
        self.parallel = 1

    def run(self, number: int, recipe: list[dict[str, Any]], deadline: float | None,
            stop_epoch: int | None = None) -> TrialResult:
        return run_trial(number, self.handle, self.task, recipe, self.budget, self.out_dir, self.config.measure,
                         selection_split=self.config.selection_split, selection_baseline=self.selection_baseline,
                         cache=self.cache, seed=self.config.seed, deadline=deadline, stop_epoch=stop_epoch)

    def run_many(self, jobs: list[Job], deadline: float | None) -> list[TrialResult]:
        return [self.run(number, recipe, deadline, stop_epoch) for number, recipe, stop_epoch in jobs]

    def close(self) -> None:
        self.cache.items.clear()


def _ray_trial(number: int, recipe: list[dict[str, Any]], stop_epoch: int | None, deadline_seconds: float | None,
               shared: dict[str, Any]) -> dict:
    """Body of the Ray task: rebuild what it needs and run the same trial code."""
    import time

    cache = _WORKER_CACHE.setdefault("cache", StepCache())
    deadline = None if deadline_seconds is None else time.monotonic() + deadline_seconds
    result = run_trial(number, shared["handle"], shared["task"], recipe, shared["budget"], Path(shared["out_dir"]),
                       shared["measure"], selection_split=shared["selection_split"],
                       selection_baseline=shared["selection_baseline"], cache=cache, seed=shared["seed"],
                       deadline=deadline, stop_epoch=stop_epoch)
    return result.to_dict()


_WORKER_CACHE: dict[str, Any] = {}


class RayExecutor:
    """Runs each trial as a Ray task (``ray.init(address=...)``; a local instance if none)."""

    def __init__(self, config: Any, handle: ModelHandle, task: Task, budget: Budget, out_dir: Path,
                 selection_baseline: float | None) -> None:
        try:
            import ray
        except ImportError as exc:
            raise MissingDependencyError(
                "--executor ray needs Ray: pip install -c constraints.txt 'compactai[distributed]'"
            ) from exc
        self.ray = ray
        threads = config.measure.threads or 1
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "ignore_reinit_error": True}
            if config.ray_address:
                kwargs["address"] = config.ray_address
            else:
                from compactai.measure import default_threads

                kwargs["num_cpus"] = default_threads()
                threads = config.measure.threads or default_threads()
            ray.init(**kwargs)
        self.started_here = not config.ray_address
        cluster_cpus = int(ray.cluster_resources().get("CPU", threads))
        self.parallel = max(1, cluster_cpus // max(threads, 1))
        self.remote = ray.remote(num_cpus=threads)(_ray_trial)
        self.shared = ray.put({
            "handle": handle, "task": task, "budget": budget, "out_dir": str(out_dir.resolve()),
            "measure": config.measure, "selection_split": config.selection_split,
            "selection_baseline": selection_baseline, "seed": config.seed,
        })

    def run(self, number: int, recipe: list[dict[str, Any]], deadline: float | None,
            stop_epoch: int | None = None) -> TrialResult:
        return self.run_many([(number, recipe, stop_epoch)], deadline)[0]

    def run_many(self, jobs: list[Job], deadline: float | None) -> list[TrialResult]:
        """Submit the jobs as Ray tasks (they run in parallel where the cluster has room)."""
        import time

        left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        refs = [self.remote.remote(number, recipe, stop_epoch, left, self.shared) for number, recipe, stop_epoch in jobs]
        return [TrialResult.from_dict(data) for data in self.ray.get(refs)]

    def close(self) -> None:
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()


def make_executor(config: Any, handle: ModelHandle, task: Task, budget: Budget, out_dir: Path, *,
                  selection_baseline: float | None = None) -> Executor:
    if config.executor == "local":
        return LocalExecutor(config, handle, task, budget, out_dir, selection_baseline)
    if config.executor == "ray":
        return RayExecutor(config, handle, task, budget, out_dir, selection_baseline)
    raise BadInputError(f"Unknown executor '{config.executor}'; choose local or ray.")
