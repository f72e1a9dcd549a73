"""Running inference off the event loop, with optional micro-batching.

:class:`Dispatcher` owns the inference threads (ONNX Runtime releases the GIL while it computes)
and knows how long the local queue is, which the fallback's latency rule reads.

:class:`MicroBatcher` stacks concurrent requests for one version on axis 0 into one ONNX Runtime
call and splits the outputs back. It dispatches at once when an inference thread is idle, so a
lone request never waits; while every thread is busy, requests gather (up to ``max_batch`` rows)
and go as one batch when a thread frees up or ``max_delay`` after the oldest arrived, whichever
comes first. A batch that fails is re-run request by request, so one bad request cannot fail
the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

INLINE_MAX_S = 0.005  # calls longer than this (recent mean) always go to an inference thread

@dataclass
class RunResult:
    """Outputs of one request and what it cost: seconds queued, seconds computing, rows in its batch."""

    outputs: list[np.ndarray]
    queue_wait_s: float
    compute_s: float
    batch_rows: int


class Dispatcher:
    """A pool of inference threads and an estimate of the wait a new request would see."""

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="compactai-infer")
        self.waiting = 0  # requests handed to the dispatcher that have not started computing
        self.running = 0  # calls computing now (batches count once)
        self.requests = 0  # inference requests the server is handling now (the infer route counts them)
        self._mean_compute_s = 0.0

    def can_run_inline(self) -> bool:
        """True when a call may run on the event loop thread instead of an inference thread: it is the
        only request in the server, no call is computing, and calls are short (recent mean under
        INLINE_MAX_S). The hand-over to a thread and back costs more than the server's whole HTTP
        handling of a small request (measured, docs/serve.md); blocking the loop for a short call
        costs nothing when no other request is there to be served."""
        return (self.requests <= 1 and self.running == 0 and self.waiting == 0
                and 0 < self._mean_compute_s < INLINE_MAX_S)

    def estimated_wait_s(self) -> float:
        """Requests ahead x recent mean compute time / threads: the latency rule of the fallback."""
        ahead = self.waiting + max(0, self.running - self.workers + 1)
        return ahead * self._mean_compute_s / self.workers

    async def call(self, run: Callable[[dict[str, np.ndarray]], list[np.ndarray]],
                   feeds: dict[str, np.ndarray], queued: int = 1,
                   inline: bool = False) -> tuple[list[np.ndarray], float, float]:
        """Run ``run(feeds)`` on an inference thread (or on this thread when ``inline`` and
        :meth:`can_run_inline` allow it): (outputs, seconds queued, seconds computing)."""
        if inline and self.can_run_inline():
            begin = time.perf_counter()
            self.running += 1
            try:
                outputs = run(feeds)
            finally:
                self.running -= 1
            compute = time.perf_counter() - begin
            self._mean_compute_s = 0.9 * self._mean_compute_s + 0.1 * compute
            return outputs, 0.0, compute
        submitted = time.perf_counter()
        started: list[float] = []
        self.waiting += queued

        def work() -> list[np.ndarray]:
            started.append(time.perf_counter())
            try:
                return run(feeds)
            finally:
                # the end of the call is taken on the inference thread: taken on the loop after the
                # await, it added the hand-back to the loop (milliseconds on a busy machine) to the
                # compute time, which probation compares between versions
                started.append(time.perf_counter())

        try:
            self.running += 1
            outputs = await asyncio.get_running_loop().run_in_executor(self.executor, work)
        finally:
            self.running -= 1
            self.waiting -= queued
        done = time.perf_counter()
        begin = started[0] if started else done
        compute = (started[1] if len(started) > 1 else done) - begin
        # an exponential moving average: recent enough to follow load, smooth enough not to flap
        self._mean_compute_s = compute if self._mean_compute_s == 0 else 0.9 * self._mean_compute_s + 0.1 * compute
        return outputs, begin - submitted, compute

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Item:
    feeds: dict[str, np.ndarray]
    rows: int
    key: tuple[Any, ...]
    future: asyncio.Future[RunResult]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Stacks requests for one model version into batches of at most ``max_batch`` rows."""

    def __init__(self, run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], dispatcher: Dispatcher,
                 max_batch: int, max_delay_s: float) -> None:
        self.run = run
        self.dispatcher = dispatcher
        self.max_batch = max(1, max_batch)
        self.max_delay_s = max(0.0, max_delay_s)
        self.pending: list[_Item] = []
        self.in_flight = 0
        self._timer: asyncio.TimerHandle | None = None

    async def submit(self, feeds: dict[str, np.ndarray]) -> RunResult:
        """Outputs for one request, computed in whatever batch it joins."""
        rows = int(next(iter(feeds.values())).shape[0])
        key = tuple(sorted((n, a.shape[1:], a.dtype.str) for n, a in feeds.items()))
        loop = asyncio.get_running_loop()
        item = _Item(feeds, rows, key, loop.create_future())
        self.pending.append(item)
        self.dispatcher.waiting += 1
        if self.in_flight < self.dispatcher.workers or sum(i.rows for i in self.pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_at(loop.time() + self.max_delay_s, self._flush)
        return await item.future

    def _flush(self) -> None:
        """Send what is pending as batches of compatible requests (same shapes past axis 0), one per
        idle inference thread. The rest stays pending and leaves when a batch finishes: queued in the
        thread pool it could not grow, and at concurrency 32 that made batches of ~3 rows instead of
        the ~30 that arrive during one call (benchmarks/serve.py)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self.pending and self.in_flight < self.dispatcher.workers:
            first = self.pending[0]
            batch, rows, rest = [first], first.rows, []
            for item in self.pending[1:]:
                if item.key == first.key and rows + item.rows <= self.max_batch:
                    batch.append(item)
                    rows += item.rows
                else:
                    rest.append(item)
            self.pending = rest
            self.in_flight += 1
            asyncio.get_running_loop().create_task(self._run_batch(batch, rows))

    async def _run_batch(self, batch: list[_Item], rows: int) -> None:
        self.dispatcher.waiting -= len(batch)
        try:
            feeds = batch[0].feeds if len(batch) == 1 else {
                name: np.concatenate([item.feeds[name] for item in batch], axis=0) for name in batch[0].feeds}
            try:
                outputs, _wait, compute = await self.dispatcher.call(self.run, feeds, queued=0)
            except Exception as exc:  # noqa: BLE001 (handed to the waiting requests, or re-run one by one)
                await self._run_alone(batch, exc)
                return
            start = 0
            for item in batch:
                mine = [out[start:start + item.rows] for out in outputs]
                start += item.rows
                queued = time.perf_counter() - item.enqueued - compute  # gathering + waiting for a thread
                if not item.future.done():
                    item.future.set_result(RunResult(mine, max(0.0, queued), compute, rows))
        finally:
            self.in_flight -= 1
            if self.pending and self.in_flight < self.dispatcher.workers:
                self._flush()

    async def _run_alone(self, batch: list[_Item], error: Exception) -> None:
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        for item in batch:
            try:
                outputs, wait, compute = await self.dispatcher.call(self.run, item.feeds, queued=0)
                item.future.set_result(RunResult(outputs, wait, compute, item.rows))
            except Exception as exc:  # noqa: BLE001 (this request's own error goes back to it)
                item.future.set_exception(exc)
