"""Model slicing: cuts on residual and attention graphs, head∘tail parity, invalid cuts with their
reason, compression on the wire, the K-part partition under memory limits, bad CLI arguments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compactai.techniques.slice import Graph, InvalidCutError
from compactai.techniques.slice.graph import LOCAL, REMOTE, compress, observe
from compactai.techniques.slice.partition import partition
from compactai.techniques.slice.placement import SliceConfig, choose, profile_cuts

IMAGES = np.random.default_rng(0).standard_normal((6, 1, 16, 16)).astype(np.float32)


class TinyAttention(nn.Module):
    """One pre-norm self-attention block and a feed-forward block, both residual."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(1, 2) / 4.0, dim=-1)
        x = x + self.proj(weights @ v)
        x = x + self.ff(self.norm2(x))
        return x.mean(dim=1)


@pytest.fixture
def attention_onnx(tmp_path: Path) -> Path:
    from compactai import load_model

    torch.manual_seed(0)
    handle = load_model(TinyAttention().eval(), torch.randn(1, 5, 4), name="tiny-attention")
    return Path(handle.to_onnx(tmp_path / "attention.onnx").path)


def _run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def _compose(graph: Graph, cut, feeds, mode="raw"):
    observed = {**observe(graph.model, {k: v[:1] for k, v in feeds.items()}, list(cut.tensors)), **feeds}
    head = graph.extract(graph.inputs, list(cut.tensors), "head", observed)
    tail = graph.extract(list(cut.tensors), graph.outputs, "tail", observed)
    floats = {t for t in cut.tensors if observed[t].dtype == np.float32}
    head, tail, _wire = compress(head, tail, cut, mode, floats)
    middle = _run(head, feeds)
    return _run(tail, middle), middle


def _full(path: Path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_residual_cnn_cuts_compose_to_the_model(small_onnx: Path) -> None:
    graph = Graph.load(small_onnx)
    cuts = graph.enumerate_cuts(max_tensors=2)
    assert cuts[0].kind == REMOTE and cuts[-1].kind == LOCAL
    splits = cuts[1:-1]
    # inside the residual block two tensors are alive: the skip and the branch
    assert any(len(c.tensors) == 2 for c in splits)
    assert all(len(c.tensors) == 1 for c in splits if c.position <= 2)
    reference = _full(small_onnx, {"image": IMAGES})
    for cut in splits:
        assert graph.validate_cut(list(cut.tensors)).tensors == cut.tensors
        outputs, _ = _compose(graph, cut, {"image": IMAGES})
        assert float(np.max(np.abs(outputs[graph.outputs[0]] - reference))) < 1e-5, cut.label


def test_a_tensor_inside_the_residual_block_is_refused_with_the_reason(small_onnx: Path) -> None:
    graph = Graph.load(small_onnx)
    branch = next(c for c in graph.enumerate_cuts(2) if len(c.tensors) == 2)
    inside = next(t for t in branch.tensors if "stem" not in t)
    with pytest.raises(InvalidCutError, match="does not separate the graph") as info:
        graph.validate_cut([inside])
    assert "cut at all of them" in str(info.value) and isinstance(info.value, ValueError)
    with pytest.raises(InvalidCutError, match="not in the model's graph"):
        graph.validate_cut(["/no/such/tensor"])
    with pytest.raises(InvalidCutError, match="is a weight"):
        graph.validate_cut([graph.model.graph.initializer[0].name])


def test_attention_cuts_skip_the_attention_internals(attention_onnx: Path) -> None:
    graph = Graph.load(attention_onnx)
    cuts = graph.enumerate_cuts(max_tensors=1)
    softmax = next(n.output[0] for n in graph.nodes if n.op_type == "Softmax")
    assert all(softmax not in c.tensors for c in cuts)
    with pytest.raises(InvalidCutError, match="does not separate"):
        graph.validate_cut([softmax])
    assert len(cuts) >= 4  # remote, at least two single-tensor cuts between blocks, local
    tokens = np.random.default_rng(1).standard_normal((3, 5, 4)).astype(np.float32)
    reference = _full(attention_onnx, {"tokens": tokens} if "tokens" in graph.inputs else {graph.inputs[0]: tokens})
    for cut in cuts[1:-1]:
        outputs, _ = _compose(graph, cut, {graph.inputs[0]: tokens})
        assert float(np.max(np.abs(outputs[graph.outputs[0]] - reference))) < 1e-5


def test_int8_on_the_wire_is_a_quarter_of_the_bytes_with_a_small_cost(small_onnx: Path) -> None:
    graph = Graph.load(small_onnx)
    cut = next(c for c in graph.enumerate_cuts(1)[1:-1])
    reference = _full(small_onnx, {"image": IMAGES})
    _raw_out, raw_mid = _compose(graph, cut, {"image": IMAGES}, "raw")
    q_out, q_mid = _compose(graph, cut, {"image": IMAGES}, "int8")
    raw_bytes = sum(v.nbytes for v in raw_mid.values())
    q_bytes = sum(v.nbytes for v in q_mid.values())
    assert q_bytes <= raw_bytes / 4 + 4
    diff = float(np.max(np.abs(q_out[graph.outputs[0]] - reference)))
    assert 0 < diff < 0.05
    assert np.array_equal(q_out[graph.outputs[0]].argmax(1), reference.argmax(1))


def test_choice_moves_with_bandwidth(small_onnx: Path, tmp_path: Path) -> None:
    config = SliceConfig(rounds=1, min_queries=10, min_seconds=0.05, compressions=("raw",))
    profiles = profile_cuts(small_onnx, {"image": IMAGES}, config, tmp_path)
    for profile in profiles:
        assert profile.fidelity["raw"]["max_abs_diff"] < 1e-5
    # a server 1000x faster: at a huge bandwidth sending the input wins, at a trickle staying local does
    fast = choose(profiles, 1e6, 0.001, 1000.0)
    slow = choose(profiles, 0.001, 50.0, 1000.0)
    assert slow["cut"]["kind"] == LOCAL
    assert fast["cut"]["kind"] != LOCAL


def test_partition_parts_fit_their_limits_and_compose(small_onnx: Path, tmp_path: Path) -> None:
    config = SliceConfig(max_cuts=2, min_queries=10, min_seconds=0.05)
    result = partition(small_onnx, {"image": IMAGES}, 2, [400.0, 400.0], config, tmp_path)
    assert len(result["parts"]) == 2
    for part in result["parts"]:
        assert part["measured_memory_mb"] <= part["limit_mb"]
    assert result["max_abs_diff"] < 1e-5
    assert result["slowest_stage_ms"] == max(p["latency_ms"] for p in result["parts"])


@pytest.mark.parametrize("args, message", [
    (["--bandwidth-mbps", "0", "--rtt-ms", "5"], "--bandwidth-mbps must be a positive"),
    (["--bandwidth-mbps", "-3", "--rtt-ms", "5"], "--bandwidth-mbps must be a positive"),
    (["--bandwidth-mbps", "10", "--rtt-ms", "0"], "--rtt-ms must be a positive"),
    (["--bandwidth-mbps", "10", "--rtt-ms", "5", "--cut", "/conv1/Conv_output_0"], "does not separate the graph"),
    (["--parts", "2", "--device-memory-mb", "100"], "needs 2 memory limits"),
])
def test_bad_arguments_exit_2(small_onnx: Path, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    from compactai.cli import main

    code = main(["slice", str(small_onnx), *args, "-o", str(tmp_path / "out")])
    assert code == 2
    assert message in " ".join(capsys.readouterr().err.split())


def test_memory_limit_below_the_smallest_part_exits_2(small_onnx: Path, tmp_path: Path, capsys) -> None:
    from compactai.cli import main

    code = main(["slice", str(small_onnx), "--parts", "2", "--device-memory-mb", "500,0.5", "--max-cuts", "2",
                 "-o", str(tmp_path / "out")])
    assert code == 2
    assert "below the smallest part" in " ".join(capsys.readouterr().err.split())
