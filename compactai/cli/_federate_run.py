"""The work behind `compactai federate`: the clients' data, the starting model, the engine, the output."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

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


def run_federate(model: str | None, example: str, spec: str, config: FederatedConfig, *, engine: str,
                 superlink: str | None, insecure: bool, alone: bool, output: Path, progress: Any) -> dict[str, Any]:
    """Run the federated job and write OUTPUT; returns the summary the CLI prints and emits."""
    from compactai.examples import load_example
    from compactai.federated.output import federated_section, handle_of, write_federated_output
    from compactai.federated.partition import split_clients
    from compactai.federated.run import clients_alone, federate_simulation

    progress(f"loading the {example} example")
    loaded = load_example(example)
    task = loaded.task
    module, origin = starting_module(model, spec, loaded.handle, config.seed)
    data = split_clients(task.split("train"), config.clients, config.alpha(), config.seed, config.holdout)
    if engine == "deployment":
        from compactai.federated.deploy import federate_deployment

        progress(f"running the ServerApp on the SuperLink at {superlink}")
        result = federate_deployment(module, task, config, superlink=str(superlink), insecure=insecure,
                                     components=("compactai.cli._federate_app:server",
                                                 "compactai.cli._federate_app:client"),
                                     run_config={"example": example, "model-spec": spec})
    else:
        progress(f"Flower simulation: {config.rounds} rounds")
        result = federate_simulation(module, task, config, clients=data)
    baseline = None
    if alone:
        progress("training each client alone (baseline)")
        baseline = clients_alone(module, task, config, clients=data)
    section = federated_section(config, engine, result.rounds, result.test, result.round0_test,
                                result.clients or [{"client": i, "train_samples": len(c.train),
                                                    "holdout_samples": len(c.holdout), "labels": c.label_counts(10)}
                                                   for i, c in enumerate(data)], baseline, result.seconds)
    handle = handle_of(result.module, task, f"{example}-federated")
    handle.metadata["history"] = [{"technique": "federate", "params": config.to_dict(),
                                   "decisions": {"engine": engine, "start": origin,
                                                 "test_accuracy": result.test["accuracy"]}}]
    progress("exporting model.onnx (parity checked)")
    paths = write_federated_output(output, handle, section, seed=config.seed,
                                   source={"example": example, **origin})
    return {
        **{k: str(v) for k, v in paths.items()}, "output_dir": str(output), "strategy": config.strategy,
        "clients": config.clients, "engine": engine, "rounds": section["rounds"],
        "test_accuracy": result.test["accuracy"], "round0_test_accuracy": result.round0_test["accuracy"],
        "clients_alone_mean": (section["clients_alone"] or {}).get("mean_accuracy"),
        "privacy": section["privacy"], "bytes_up_total": section["bytes_up_total"],
        "bytes_down_total": section["bytes_down_total"],
    }
