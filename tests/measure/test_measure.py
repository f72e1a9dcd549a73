from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compactai import MeasureConfig, load_model, measure
from compactai.measure import count_macs, make_runner, measure_latency, size_on_disk
from compactai.measure import energy as energy_module
from compactai.measure.energy import measure_energy


def test_measure_onnxruntime_figures(small_handle):
    config = MeasureConfig(min_queries=40, min_seconds=0.1, warmup=3, throughput_batch=8, throughput_min_batches=3)
    m = measure(small_handle, runtime="onnxruntime", config=config)
    assert m.runtime == "onnxruntime" and m.threads >= 1
    assert m.latency_queries >= 40
    assert 0 < m.latency_p50_ms <= m.latency_p90_ms <= m.latency_p99_ms
    assert m.size_bytes == size_on_disk(small_handle.to_onnx().path)
    assert m.throughput_items_per_s > 0 and m.throughput_batch == 8
    assert m.peak_memory_mb is not None and m.peak_memory_mb > m.model_memory_mb > 0
    assert m.energy_method in ("rapl", "estimated") and m.energy_mj > 0
    assert ("W per busy core" in m.energy_formula) == (m.energy_method == "estimated")


def test_measure_torch_runtime_and_quality(small_handle):
    from compactai import Accuracy, Split, Task

    rng = np.random.default_rng(0)
    split = Split({"image": rng.standard_normal((20, 1, 16, 16)).astype(np.float32)}, rng.integers(0, 10, 20))
    task = Task("toy", Accuracy(), {"test": split}, baseline=0.5)
    m = measure(small_handle, task, runtime="torch", config=MeasureConfig.quick())
    assert m.runtime == "torch"
    assert m.params == sum(p.numel() for p in small_handle.module.parameters())
    assert m.quality["metric"] == "accuracy" and m.quality["baseline"] == 0.5
    assert m.quality["relative"] == pytest.approx(m.quality["value"] / 0.5)


def test_latency_respects_minimums():
    class Sleepy:
        runtime, threads = "fake", 1

        def __init__(self):
            self.calls = 0

        def run(self, feeds):
            self.calls += 1
            return []

    runner = Sleepy()
    stats = measure_latency(runner, {}, min_queries=30, min_seconds=0.05, warmup=7)
    assert stats.queries >= 30 and runner.calls == stats.queries + 7
    assert stats.seconds >= 0.05


def test_macs_of_a_known_conv_match_on_both_runtimes(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    handle = load_model(model, torch.randn(1, 1, 8, 8))
    expected = 8 * 8 * 4 * (1 * 3 * 3) + 4 * 8 * 8 * 5
    assert count_macs(handle) == expected
    onnx_handle = load_model(handle.to_onnx(tmp_path / "m.onnx").path)
    assert count_macs(onnx_handle) == expected


def test_energy_estimate_formula_without_rapl(tmp_path, monkeypatch):
    monkeypatch.setattr(energy_module, "RAPL_ROOT", tmp_path / "no-powercap")  # a machine without RAPL
    energy = measure_energy(lambda: (100, 0.5), cpu_seconds=0.5, queries=100, core_watts=10.0)
    assert energy.method == "estimated"
    assert energy.millijoules_per_inference == pytest.approx(0.5 / 100 * 10.0 * 1e3)
    assert "10 W" in energy.formula


def test_energy_from_rapl_counters(tmp_path, monkeypatch):
    """A powercap tree like the kernel's (two packages, one sub-zone that must not be counted twice)."""
    zones = [tmp_path / "intel-rapl:0", tmp_path / "intel-rapl:1", tmp_path / "intel-rapl:0:0"]
    for zone in zones:
        zone.mkdir()
        (zone / "energy_uj").write_text("1000000\n")
    monkeypatch.setattr(energy_module, "RAPL_ROOT", tmp_path)

    def run_queries():  # 50 queries that cost 0.2 J on each package (and 0.1 J in the sub-zone)
        for zone, used in zip(zones, (200_000, 200_000, 100_000)):
            (zone / "energy_uj").write_text(f"{1_000_000 + used}\n")
        return 50, 0.01

    energy = measure_energy(run_queries, core_watts=10.0)
    assert energy.method == "rapl" and "RAPL" in energy.formula
    assert energy.millijoules_per_inference == pytest.approx(400_000 / 1e3 / 50)


def test_onnx_runner_threads_are_explicit(small_handle):
    runner = make_runner(small_handle, "onnxruntime", threads=1)
    assert runner.threads == 1
    assert runner.session.get_session_options().intra_op_num_threads == 1


def test_size_counts_external_data(tmp_path, small_handle):
    path = small_handle.to_onnx(tmp_path / "a.onnx").path
    model = onnx.load(str(path))
    onnx.save_model(model, str(tmp_path / "b.onnx"), save_as_external_data=True,
                    location="b.onnx.data", size_threshold=0)
    assert size_on_disk(tmp_path / "b.onnx") > (tmp_path / "b.onnx").stat().st_size


def test_interleaved_rounds_rotate_which_model_goes_first(monkeypatch, small_handle):
    import sys

    measure_module = sys.modules["compactai.measure"]  # the package: ``compactai.measure`` is also a function
    order: list[int] = []
    runners = iter(range(3))
    monkeypatch.setattr(measure_module, "make_runner", lambda handle, runtime, threads=None: next(runners))

    class Stats:
        p50_ms = p90_ms = 1.0

    def fake_latency(runner, feeds, **kwargs):
        order.append(runner)
        return Stats()

    monkeypatch.setattr(measure_module, "measure_latency", fake_latency)
    result = measure_module.interleaved_latency([small_handle] * 3, MeasureConfig(), rounds=3)
    assert order == [0, 1, 2, 1, 2, 0, 2, 0, 1]
    assert [len(r["latency_rounds_ms"]) for r in result] == [3, 3, 3]
