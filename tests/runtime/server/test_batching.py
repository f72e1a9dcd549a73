"""Micro-batching: the same outputs as unbatched calls under concurrency, and requests really share calls."""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np

from compactai.runtime.server import BatchSettings
from compactai.runtime.server.batching import Dispatcher, MicroBatcher
from compactai.runtime.server.models import load_onnx_file
from tests.runtime.conftest import tiny_model


def test_concurrent_requests_get_their_own_rows(serve, make_bundle, keys) -> None:
    running = serve(make_bundle(1, name="tiny", scale=3.0), trusted_keys=[keys[1]],
                    batching=BatchSettings(8, 5.0))
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal((1 + i % 3, 4)).astype(np.float32) for i in range(48)]

    async def drive() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=running.url, timeout=60) as client:
            async def one(x: np.ndarray) -> httpx.Response:
                body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                    "data": x.ravel().tolist()}]}
                return await client.post("/v2/models/tiny/infer", json=body)

            return await asyncio.gather(*(one(x) for x in inputs))

    answers = asyncio.run(drive())
    for x, answer in zip(inputs, answers):
        assert answer.status_code == 200, answer.text
        out = answer.json()["outputs"][0]
        assert out["shape"] == list(x.shape)
        np.testing.assert_allclose(np.array(out["data"], dtype=np.float32).reshape(x.shape), 3 * x, rtol=1e-6)


def test_requests_waiting_for_a_busy_thread_share_one_call(tmp_path) -> None:
    """A call that blocks holds the only inference thread; the next requests gather into one batch."""
    loaded = load_onnx_file(tiny_model(tmp_path / "m.onnx", scale=2.0), threads=1, name="tiny")
    release, calls = threading.Event(), []

    def run(feeds):
        calls.append(feeds["x"].shape[0])
        if len(calls) == 1:
            release.wait(30)
        return loaded.run(feeds)

    async def scenario():
        batcher = MicroBatcher(run, Dispatcher(1), max_batch=16, max_delay_s=10.0)
        first = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 4), np.float32)}))
        while not calls:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit({"x": np.full((1, 4), i, np.float32)})) for i in range(5)]
        await asyncio.sleep(0.05)
        assert len(calls) == 1  # the others wait: the only thread is busy
        release.set()
        return await first, await asyncio.gather(*rest)

    first, rest = asyncio.run(scenario())
    assert calls == [1, 5]
    np.testing.assert_array_equal(first.outputs[0], np.full((1, 4), 2, np.float32))
    for i, result in enumerate(rest):
        assert result.batch_rows == 5
        np.testing.assert_array_equal(result.outputs[0], np.full((1, 4), 2 * i, np.float32))


def test_a_failing_batch_is_rerun_request_by_request(tmp_path) -> None:
    loaded = load_onnx_file(tiny_model(tmp_path / "m.onnx"), threads=1, name="tiny")
    release = threading.Event()
    seen: list[int] = []

    def run(feeds):
        seen.append(feeds["x"].shape[0])
        if len(seen) == 1:
            release.wait(30)
        if np.isnan(feeds["x"]).any() and feeds["x"].shape[0] == 1:
            raise ValueError("this one request is bad")
        if feeds["x"].shape[0] > 1 and np.isnan(feeds["x"]).any():
            raise ValueError("the batch holding it fails")
        return loaded.run(feeds)

    async def scenario():
        batcher = MicroBatcher(run, Dispatcher(1), max_batch=16, max_delay_s=10.0)
        first = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 4), np.float32)}))
        while not seen:
            await asyncio.sleep(0.001)
        good = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 4), np.float32)}))
        bad = asyncio.ensure_future(batcher.submit({"x": np.full((1, 4), np.nan, np.float32)}))
        await asyncio.sleep(0.05)
        release.set()
        await first
        return await asyncio.gather(good, bad, return_exceptions=True)

    good, bad = asyncio.run(scenario())
    assert isinstance(bad, ValueError) and "this one request" in str(bad)
    np.testing.assert_array_equal(good.outputs[0], np.full((1, 4), 2, np.float32))


def test_requests_gathering_behind_a_busy_thread_are_not_sent_as_small_batches(tmp_path) -> None:
    """The delay bound passing while the only thread is busy does not send what gathered so far into the
    thread pool's queue (where it could not grow): everything waiting leaves as one batch when the thread frees."""
    loaded = load_onnx_file(tiny_model(tmp_path / "m.onnx", scale=2.0), threads=1, name="tiny")
    release, calls = threading.Event(), []

    def run(feeds):
        calls.append(feeds["x"].shape[0])
        if len(calls) == 1:
            release.wait(30)
        return loaded.run(feeds)

    async def scenario():
        batcher = MicroBatcher(run, Dispatcher(1), max_batch=16, max_delay_s=0.001)
        first = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 4), np.float32)}))
        while not calls:
            await asyncio.sleep(0.001)
        early = [asyncio.ensure_future(batcher.submit({"x": np.ones((1, 4), np.float32)})) for _ in range(2)]
        await asyncio.sleep(0.05)  # fifty times the delay bound
        late = [asyncio.ensure_future(batcher.submit({"x": np.ones((1, 4), np.float32)})) for _ in range(3)]
        await asyncio.sleep(0.01)
        release.set()
        return await first, await asyncio.gather(*early, *late)

    _first, rest = asyncio.run(scenario())
    assert calls == [1, 5]
    assert [r.batch_rows for r in rest] == [5] * 5


def test_a_lone_short_request_runs_on_the_event_loop_thread(tmp_path) -> None:
    """Inline only when the call is alone and known to be short; the first call (no mean yet), a call
    with other requests in the server and a slow model's call go to an inference thread."""
    loaded = load_onnx_file(tiny_model(tmp_path / "m.onnx", scale=2.0), threads=1, name="tiny")
    threads: list[str] = []

    def run(feeds):
        threads.append(threading.current_thread().name)
        return loaded.run(feeds)

    async def scenario():
        dispatcher = Dispatcher(1)
        feeds = {"x": np.ones((1, 4), np.float32)}
        dispatcher.requests = 1
        await dispatcher.call(run, feeds, inline=True)  # no compute time known yet: a thread
        await dispatcher.call(run, feeds, inline=True)  # alone and short: the loop thread
        await dispatcher.call(run, feeds)  # not asked for (the micro-batcher never asks)
        dispatcher.requests = 2
        await dispatcher.call(run, feeds, inline=True)  # another request is in the server
        dispatcher.requests = 1
        dispatcher._mean_compute_s = 1.0
        await dispatcher.call(run, feeds, inline=True)  # a slow model would block the loop
        dispatcher.shutdown()
        return threading.current_thread().name

    loop_thread = asyncio.run(scenario())
    assert [name == loop_thread for name in threads] == [False, True, False, False, False]
    assert all(name.startswith("compactai-infer") for name in threads if name != loop_thread)


def test_default_workers_fill_the_cpus_the_threads_leave(tmp_path) -> None:
    from compactai.measure.runtime import default_threads
    from compactai.runtime.server import ModelServer, ServeConfig

    model = tiny_model(tmp_path / "m.onnx")
    one_thread = ModelServer(model, ServeConfig(threads=1))
    assert one_thread.workers == one_thread.dispatcher.workers == default_threads()
    assert ModelServer(model, ServeConfig()).workers == 1  # intra-op threads already use every CPU
    assert ModelServer(model, ServeConfig(threads=1, workers=3)).dispatcher.workers == 3
