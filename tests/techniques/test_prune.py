"""Pruning: structured (residual CNN, MobileNetV2-style, MLP, MiniLM heads + FFN), criteria,
protected layers, targets, replay, FFN reconstruction, unstructured sparsity and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from compactai import load_model
from compactai.errors import BadInputError, ParameterError, TechniqueError, UnsupportedFormatError
from compactai.models import zoo
from compactai.tasks import Accuracy, EmbeddingFidelity, Split, Task
from compactai.techniques import Context, create_technique
from compactai.techniques.prune import replay
from compactai.techniques.prune.engine import attention_modules
from compactai.techniques.prune.structured import count_params, example_args


def tiny_task(shape: tuple[int, ...], n: int = 64, classes: int = 10) -> Task:
    rng = np.random.default_rng(0)

    def split(size: int) -> Split:
        return Split({"image": rng.standard_normal((size, *shape)).astype(np.float32)},
                     rng.integers(0, classes, size).astype(np.int64))

    splits = {"train": split(n), "calibration": split(32), "validation": split(32), "test": split(32)}
    return Task(name="tiny", metric=Accuracy(), splits=splits, batch_size=32)


def prune(handle, task=None, **params):
    return create_technique("structured_prune", **params).apply(handle, Context(task=task))


def decisions(handle) -> dict:
    return handle.metadata["history"][-1]["decisions"]


def assert_exports_with_parity(handle) -> None:
    onnx_handle = handle.to_onnx()  # raises ParityError when ONNX Runtime disagrees with torch
    assert onnx_handle.metadata["parity"]["ok"]


@pytest.fixture
def mobilenet_handle():
    torch.manual_seed(0)
    return load_model(zoo.mobilenet_v2_small(), torch.randn(1, 1, 16, 16), name="mnv2")


def test_residual_cnn_channels_removed_shapes_kept_and_exported(small_handle):
    before = count_params(small_handle.module)
    state = {k: v.clone() for k, v in small_handle.module.state_dict().items()}
    pruned = prune(small_handle, ratio=0.5, target="params", criterion="l1")
    assert count_params(pruned.module) <= 0.5 * before
    assert pruned.run_torch(small_handle.example_inputs)[0].shape == (1, 10)
    assert_exports_with_parity(pruned)
    # the input model is untouched
    assert all(torch.equal(v, small_handle.module.state_dict()[k]) for k, v in state.items())
    history = decisions(pruned)["history"]
    assert history and all(e["criterion"] == "l1" and e["count"] == len(e["removed"]) for e in history)
    json.dumps(pruned.metadata["history"])  # plain data


def test_mobilenet_v2_depthwise_and_inverted_residuals(mobilenet_handle):
    before = count_params(mobilenet_handle.module)
    pruned = prune(mobilenet_handle, ratio=0.4, target="channels", criterion="bn", ranking="global")
    assert count_params(pruned.module) < 0.8 * before
    depthwise = [m for m in pruned.module.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert pruned.run_torch(mobilenet_handle.example_inputs)[0].shape == (1, 10)
    assert_exports_with_parity(pruned)


def test_mlp_hidden_neurons():
    handle = load_model(zoo.mlp(hidden=(64, 32)), torch.randn(1, 64), name="mlp")
    pruned = prune(handle, ratio=0.5, target="channels", protect_first=False)
    widths = [m.out_features for m in pruned.module.modules() if isinstance(m, nn.Linear)]
    assert widths == [32, 16, 10]
    assert_exports_with_parity(pruned)


def test_target_macs_is_reached(small_handle):
    from compactai.measure import count_macs

    base_macs = count_macs(small_handle)
    by_macs = prune(small_handle, ratio=0.3, target="macs", protect_first=False)
    assert count_macs(by_macs) <= 0.7 * base_macs
    assert decisions(by_macs)["reduction"]["macs"] >= 0.3
    assert decisions(by_macs)["steps"][0]["probes"] > 1  # found by bisection over the channel fraction


def test_taylor_uses_task_gradients_and_finetune_runs(small_handle):
    task = tiny_task((1, 16, 16))
    taylor = prune(small_handle, task, ratio=0.5, target="channels", criterion="taylor", finetune_epochs=1,
                   max_batches=2, batch_size=16)
    l2 = prune(small_handle, task, ratio=0.5, target="channels", criterion="l2")
    removed = {e["layer"]: e["removed"] for e in decisions(taylor)["history"]}
    assert removed != {e["layer"]: e["removed"] for e in decisions(l2)["history"]}
    tuned = decisions(taylor)["steps"][0]["finetune"]
    assert tuned["epochs_run"] == 1 and len(tuned["validation"]) == 2
    with pytest.raises(ParameterError, match="taylor criterion needs task data"):
        prune(small_handle, ratio=0.5, criterion="taylor")


def test_iterative_schedule_and_replay(mobilenet_handle):
    pruned = prune(mobilenet_handle, ratio=0.5, target="channels", steps=2)
    info = decisions(pruned)
    assert [s["step"] for s in info["steps"]] == [1, 2]
    assert info["reduction"]["channels"] == pytest.approx(0.5, abs=0.02)
    again = replay(mobilenet_handle.module, example_args(mobilenet_handle), info["history"])
    assert count_params(again) == count_params(pruned.module)


def test_protected_layers(small_handle):
    pruned = prune(small_handle, ratio=0.5, target="channels", protect=["conv1"], protect_first=False)
    assert pruned.module.conv1.out_channels == small_handle.module.conv1.out_channels
    assert pruned.module.stem[0].out_channels < small_handle.module.stem[0].out_channels
    kept_first = prune(small_handle, ratio=0.5, target="channels")  # first and last layers protected by default
    assert kept_first.module.stem[0].out_channels == small_handle.module.stem[0].out_channels
    with pytest.raises(ParameterError, match=r"'conv9'.*similar layer names: .*conv1"):
        prune(small_handle, ratio=0.5, protect=["conv9"])


@pytest.mark.parametrize("ranking", ["layer", "global"])
def test_unstructured_reports_real_zero_fraction(small_handle, ranking):
    sparse = create_technique("unstructured_prune", ratio=0.8, ranking=ranking).apply(small_handle, Context(task=None))
    info = decisions(sparse)
    assert info["zero_fraction"] == pytest.approx(0.8, abs=0.02)
    zeros = sum(int((sparse.module.get_submodule(n).weight == 0).sum()) for n in info["per_layer_sparsity"])
    total = sum(sparse.module.get_submodule(n).weight.numel() for n in info["per_layer_sparsity"])
    assert zeros / total == pytest.approx(info["zero_fraction"])
    assert count_params(sparse.module) == count_params(small_handle.module)  # shapes unchanged
    assert "no speed-up" in info["note"]
    assert_exports_with_parity(sparse)


def test_unstructured_gradual_with_finetune_keeps_masks(small_handle):
    task = tiny_task((1, 16, 16))
    augmented: list[int] = []
    sparse = create_technique("unstructured_prune", ratio=0.6, steps=2, finetune_epochs=1, max_batches=2,
                              batch_size=16, augment=lambda args: augmented.append(1) or args,
                              ).apply(small_handle, Context(task=task))
    assert len(augmented) == 4  # 2 steps x 2 batches
    info = decisions(sparse)
    assert [round(s["sparsity"], 3) for s in info["steps"]] == [0.525, 0.6]
    assert info["zero_fraction"] == pytest.approx(0.6, abs=0.02)


@pytest.mark.parametrize("technique", ["structured_prune", "unstructured_prune"])
def test_finetune_in_rungs_continues_from_its_checkpoint_and_ends_as_one_run(small_handle, tmp_path, technique):
    """The optimizer's multi-fidelity schedule pauses pruning's fine-tune at a rung (Context.stop_epoch)
    and continues it later from the checkpoint in the step's work directory: paused at 1 and continued to
    3, it trains exactly as one 3-epoch run."""
    rng = np.random.default_rng(0)

    def split(size: int) -> Split:  # learnable: which half of the image is brighter
        images = rng.standard_normal((size, 1, 16, 16)).astype(np.float32)
        return Split({"image": images}, (images[:, 0, :8].mean((1, 2)) > images[:, 0, 8:].mean((1, 2))).astype(np.int64))

    task = Task(name="halves", metric=Accuracy(), splits={"train": split(256), "validation": split(128)}, batch_size=32)
    params = {"ratio": 0.5, "finetune_epochs": 3, "batch_size": 32, "lr": 3e-3}
    if technique == "structured_prune":
        params["target"] = "channels"

    def run(work, stop_epoch):
        context = Context(task=task, work_dir=tmp_path / work, stop_epoch=stop_epoch)
        return create_technique(technique, **params).apply(small_handle, context)

    def finetune_record(handle):
        return decisions(handle)["steps"][-1]["finetune"]

    whole = finetune_record(run("whole", 3))  # one uninterrupted 3-epoch run (saving its end state)
    paused = finetune_record(run("rungs", 1))
    assert paused["epochs_run"] == 1 and paused["stop_epoch"] == 1 and "resumed_from_epoch" not in paused
    continued = finetune_record(run("rungs", 3))
    assert continued["resumed_from_epoch"] == 1 and continued["epochs_run"] == whole["epochs_run"] == 3
    assert continued["validation"] == pytest.approx(whole["validation"], abs=1e-6)
    ends = [load_file(str(tmp_path / work / "finetune-step1" / "model.safetensors")) for work in ("whole", "rungs")]
    assert ends[0].keys() == ends[1].keys()
    for name, tensor in ends[0].items():  # the last step's weights, not the best ones: they moved at every step
        torch.testing.assert_close(ends[1][name], tensor, msg=name)
    again = finetune_record(run("rungs", 3))  # the same rung once more: nothing left to train
    assert again["resumed_from_epoch"] == continued["epochs_run"] and again["epochs_run"] == continued["epochs_run"]


@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_ratio_outside_open_interval(small_handle, ratio):
    with pytest.raises(ParameterError, match=r"'ratio' parameter of StructuredPrune must be a float in the range \(0, 1\)"):
        prune(small_handle, ratio=ratio)


def test_bad_input_errors(small_handle):
    with pytest.raises(ParameterError, match=r"'criterion'.*l1, l2, taylor, bn"):
        prune(small_handle, criterion="magic")
    with pytest.raises(ParameterError, match="scope='channels'"):
        prune(small_handle, scope="heads")


def test_torch_export_program_prunes_through_onnx(small_cnn, tmp_path):
    program = torch.export.export(small_cnn, (torch.randn(1, 1, 16, 16),))
    torch.export.save(program, tmp_path / "small.pt2")
    pruned = prune(load_model(tmp_path / "small.pt2"), ratio=0.5)  # functional ops get real layers back
    assert "onnx2torch" in pruned.metadata["converted_from"]
    assert count_params(pruned.module) < sum(p.numel() for p in small_cnn.parameters())


class HardCodedReshape(nn.Module):
    """Flattens with a hard-coded width: the graph engine cannot follow it, so pruning conv must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv(torch.relu(self.stem(image)))
        return self.fc(x.reshape(x.shape[0], 8 * 8 * 8))


def test_unprunable_architecture_names_the_layer_and_returns_nothing_half_pruned():
    torch.manual_seed(0)
    model = HardCodedReshape().eval()
    handle = load_model(model, torch.randn(1, 1, 8, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedFormatError, match=r"'conv'.*protect") as refused:
        prune(handle, ratio=0.5, target="channels")
    assert refused.value.exit_code == 2  # a refusal of this model as asked, not an internal error
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(TechniqueError("x"), RuntimeError) and not isinstance(TechniqueError("x"), BadInputError)


@pytest.fixture
def tiny_bert():
    """A 2-layer BERT (hidden 32, FFN 64) with random weights and a task of random token ids
    with padding; offline, a second to build."""
    from transformers import BertConfig, BertModel

    from compactai.models.load import SentenceEncoder

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32)
    encoder = SentenceEncoder(BertModel(config).eval()).eval()
    rng = np.random.default_rng(0)

    def split(size: int) -> Split:
        lengths = rng.integers(4, 17, size)
        mask = (np.arange(16)[None, :] < lengths[:, None]).astype(np.int64)
        return Split({"input_ids": rng.integers(1, 100, (size, 16)) * mask, "attention_mask": mask})

    splits = {"train": split(256), "calibration": split(32), "validation": split(64), "test": split(64)}
    handle = load_model(encoder, {k: v[:2] for k, v in splits["test"].inputs.items()}, name="tiny-bert")
    task = Task("tiny-embeddings", EmbeddingFidelity(handle.run_torch), splits,
                eval_split="validation")
    return handle, task


def token_error(handle, pruned, split: Split) -> float:
    """Mean squared error of the real tokens' embeddings, pruned vs original."""
    reference, candidate = handle.run_torch(split.inputs)[0], pruned.run_torch(split.inputs)[0]
    real = split.inputs["attention_mask"].astype(bool)
    return float(((reference - candidate)[real] ** 2).mean())


@pytest.mark.parametrize("scope", ["ffn", "ffn+heads"])
def test_ffn_reconstruction_lowers_the_output_error(tiny_bert, scope):
    handle, task = tiny_bert
    settings = {"ratio": 0.25, "target": "channels", "scope": scope, "criterion": "l2"}
    plain = prune(handle, task, **settings)
    rebuilt = prune(handle, task, reconstruct=True, **settings)
    assert [m.out_features for n, m in rebuilt.module.named_modules() if n.endswith("intermediate.dense")] == [48, 48]
    assert decisions(rebuilt)["history"] == decisions(plain)["history"]  # same neurons removed, only re-fitted
    held_out = task.split("validation")
    assert token_error(handle, rebuilt, held_out) < 0.5 * token_error(handle, plain, held_out)
    fits = decisions(rebuilt)["steps"][0]["reconstruction"]
    ffn_fits = [f"encoder.encoder.layer.{i}.output.dense" for i in (0, 1)]
    assert [f["layer"] for f in fits if "attention" not in f["layer"]] == ffn_fits
    assert all(f["error_after"] < f["error_before"] and f["tokens"] > 1000 for f in fits)
    json.dumps(fits)  # plain data
    assert_exports_with_parity(rebuilt)


def test_head_reconstruction_refits_the_attention_output_of_layers_that_lost_heads(tiny_bert):
    handle, task = tiny_bert
    # heads ranked globally: the layers lose different numbers of heads, possibly none
    settings = {"ratio": 0.25, "target": "channels", "scope": "heads", "criterion": "l2", "ranking": "global"}
    plain = prune(handle, task, **settings)
    rebuilt = prune(handle, task, reconstruct=True, **settings)
    assert decisions(rebuilt)["history"] == decisions(plain)["history"]
    narrowed = sorted({e["layer"].rsplit(".", 2)[0] for e in decisions(rebuilt)["history"]})
    assert narrowed, "nothing was pruned"
    fits = decisions(rebuilt)["steps"][0]["reconstruction"]
    assert [f["layer"] for f in fits] == [f"{layer}.output.dense" for layer in narrowed]  # in forward order
    assert all(f["error_after"] < f["error_before"] for f in fits)
    held_out = task.split("validation")
    assert token_error(handle, rebuilt, held_out) < 0.7 * token_error(handle, plain, held_out)
    assert_exports_with_parity(rebuilt)


def test_fluctuation_criterion_uses_activations(tiny_bert):
    handle, task = tiny_bert
    settings = {"ratio": 0.25, "target": "channels", "scope": "ffn+heads"}
    by_activation = decisions(prune(handle, task, criterion="fluctuation", **settings))["history"]
    by_weight = decisions(prune(handle, task, criterion="l2", **settings))["history"]
    assert {e["kind"] for e in by_activation} == {"ffn", "heads"}
    assert [e["removed"] for e in by_activation] != [e["removed"] for e in by_weight]
    with pytest.raises(ParameterError, match="fluctuation criterion needs task data"):
        prune(handle, None, criterion="fluctuation", **settings)


def test_reconstruction_is_refused_where_it_does_not_apply(tiny_bert, small_handle):
    handle, _ = tiny_bert
    with pytest.raises(ParameterError, match=r"'reconstruct' parameter.*without attention layers.*scope='ffn', 'heads'"):
        prune(small_handle, tiny_task((1, 16, 16)), ratio=0.25, reconstruct=True)
    with pytest.raises(ParameterError, match="Reconstruction needs task data"):
        prune(handle, None, ratio=0.25, scope="ffn", reconstruct=True)


@pytest.mark.slow
def test_minilm_heads_and_ffn_neurons(minilm):
    handle = minilm.handle
    pruned = prune(handle, ratio=0.25, target="channels", scope="ffn+heads", criterion="l2")
    attention = list(attention_modules(pruned.module).values())
    heads = [a.num_attention_heads for a in attention]
    assert sum(heads) == 72 - int(0.25 * 12) * 6
    assert all(a.all_head_size == a.query.out_features == a.num_attention_heads * a.attention_head_size
               for a in attention)
    ffn = [m.out_features for n, m in pruned.module.named_modules() if n.endswith("intermediate.dense")]
    assert ffn == [1152] * 6
    assert pruned.module.encoder.embeddings.word_embeddings.embedding_dim == 384  # hidden size kept
    out = pruned.run_torch(handle.example_inputs)[0]
    assert out.shape == (*handle.example_inputs["input_ids"].shape, 384)
    assert count_params(pruned.module) < count_params(handle.module) - 2_000_000
    assert_exports_with_parity(pruned)
    assert attention_modules(handle.module)["encoder.encoder.layer.0.attention.self"].num_attention_heads == 12


@pytest.mark.slow
def test_cli_prune_digits_writes_results(tmp_path, digits):
    from compactai.cli import main

    code = main(["prune", "--example", "digits", "--ratio", "0.3", "--target", "channels", "--queries", "5",
                 "--seconds", "0.05", "--runtime", "onnxruntime", "-o", str(tmp_path), "--json"])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["command"] == "prune" and (tmp_path / "model.onnx").exists()
    assert results["measurements"]["onnxruntime"]["params"] < results["baseline"]["onnxruntime"]["params"]
    assert results["lineage"][-1]["technique"] == "structured_prune"
    assert main(["prune", "--example", "digits", "--ratio", "1.5"]) == 2
