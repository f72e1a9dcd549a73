"""The work behind `compactai federate`: the clients' data, the starting model, the engine, the output."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from compactai.errors import BadInputError
from compactai.federated.config import FederatedConfig


def starting_module(model: str | None, spec: str, teacher: Any, seed: int) -> tuple[Any, dict[str, Any]]:
    """The torch module federated training starts from, and where it came from."""
    import torch

    from compactai.techniques.distill.students import build_student, parse_student_spec

    if model is None:
        parsed = parse_student_spec(spec)
        torch.manual_seed(seed)
        context = type("SeedOnly", (), {"seed": seed})()
        module = build_student(parsed, teacher, context)
        return module, {"model_spec": spec}
    path = Path(model)
    if path.is_dir():
        path = path / "model.onnx"
    if not path.exists():
        raise BadInputError(f"No model at {model}: give an output directory of prune/distill, a model.onnx or a .pt2.")
    if path.suffix == ".pt2":
        from compactai.models.load import load_pt2

        handle = load_pt2(path)
        return copy.deepcopy(handle.module), {"path": str(path)}
    if path.suffix == ".onnx":
        from compactai.federated.onnx_module import onnx_to_torch

        return onnx_to_torch(path), {"path": str(path)}
    raise BadInputError(f"{model} is not an output directory, .onnx or .pt2 file; federate trains those.")


def own_data_task(model: str, data: Path) -> Any:
    """The task of ``--data``: the user's labelled splits, read for the inputs of MODEL (judged
    against MODEL as ONNX Runtime runs it, like quantize's ``--data``); a train split is required."""
    from compactai.cli._common import task_from_data
    from compactai.models import load_model

    path = Path(model)
    if path.is_dir():
        path = path / "model.onnx"
    task = task_from_data(data, load_model(path))
    if "train" not in task.splits or task.splits["train"].labels is None:
        raise BadInputError(f"{data} has no labelled train split for the clients: add 'train/<input>' arrays and "
                            "'train/labels'.")
    return task


def run_federate(model: str | None, example: str | None, spec: str, config: FederatedConfig, *, engine: str,
                 superlink: str | None, insecure: bool, alone: bool, output: Path, progress: Any,
                 data: Path | None = None) -> dict[str, Any]:
    """Run the federated job and write OUTPUT; returns the summary the CLI prints and emits."""
    from compactai.examples import load_example
    from compactai.federated.output import federated_section, handle_of, write_federated_output
    from compactai.federated.partition import split_clients
    from compactai.federated.run import clients_alone, federate_simulation

    if data is not None and model is not None:
        progress(f"reading the clients' data from {data}")
        task = own_data_task(model, data)
        module, origin = starting_module(model, spec, None, config.seed)
        origin["data"] = str(data)
    else:
        progress(f"loading the {example} example")
        loaded = load_example(str(example))
        task = loaded.task
        module, origin = starting_module(model, spec, loaded.handle, config.seed)
    classes = int(max(int(np.max(s.labels)) for s in task.splits.values() if s.labels is not None)) + 1
    clients_data = split_clients(task.split("train"), config.clients, config.alpha(), config.seed, config.holdout)
    if engine == "deployment":
        from compactai.federated.deploy import federate_deployment

        progress(f"running the ServerApp on the SuperLink at {superlink}")
        result = federate_deployment(module, task, config, superlink=str(superlink), insecure=insecure,
                                     components=("compactai.cli._federate_app:server",
                                                 "compactai.cli._federate_app:client"),
                                     run_config={"example": example, "model-spec": spec})
    else:
        progress(f"Flower simulation: {config.rounds} rounds")
        result = federate_simulation(module, task, config, clients=clients_data, classes=classes)
    baseline = None
    if alone:
        progress("training each client alone (baseline)")
        baseline = clients_alone(module, task, config, clients=clients_data)
    section = federated_section(config, engine, result.rounds, result.test, result.round0_test,
                                result.clients or [{"client": i, "train_samples": len(c.train),
                                                    "holdout_samples": len(c.holdout), "labels": c.label_counts(classes)}
                                                   for i, c in enumerate(clients_data)], baseline, result.seconds)
    handle = handle_of(result.module, task, f"{example or Path(str(model)).stem}-federated")
    handle.metadata["history"] = [{"technique": "federate", "params": config.to_dict(),
                                   "decisions": {"engine": engine, "start": origin,
                                                 "test_accuracy": result.test["accuracy"]}}]
    progress("exporting model.onnx (parity checked)")
    paths = write_federated_output(output, handle, section, seed=config.seed,
                                   source={"example": example, **origin} if example else origin)
    return {
        **{k: str(v) for k, v in paths.items()}, "output_dir": str(output), "strategy": config.strategy,
        "clients": config.clients, "engine": engine, "rounds": section["rounds"],
        "test_accuracy": result.test["accuracy"], "round0_test_accuracy": result.round0_test["accuracy"],
        "clients_alone_mean": (section["clients_alone"] or {}).get("mean_accuracy"),
        "privacy": section["privacy"], "bytes_up_total": section["bytes_up_total"],
        "bytes_down_total": section["bytes_down_total"],
    }
