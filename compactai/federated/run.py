"""Running a federated job on Flower's simulation engine, and the baselines it is judged by.

``run_simulation`` starts Flower's simulation runtime (Ray underneath) with explicit, light
client resources: one CPU per client actor and at most as many actors as the machine has cores,
so a 10-client run on 2 cores trains two clients at a time instead of oversubscribing.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compactai.errors import TechniqueError, require
from compactai.federated.config import FederatedConfig
from compactai.federated.local import evaluate, get_weights, set_weights, train_local
from compactai.federated.partition import ClientData, split_clients
from compactai.tasks import Task

log = logging.getLogger(__name__)


@dataclass
class FederatedResult:
    """The outcome as plain data plus the trained module."""

    module: Any
    rounds: list[dict[str, Any]]
    test: dict[str, float]
    round0_test: dict[str, float]
    clients: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def client_resources(config: FederatedConfig) -> Any:
    """Flower's backend config: one CPU per client actor, Ray limited to this machine's cores."""
    cores = max(1, min(os.cpu_count() or 1, config.clients))
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cores, "num_gpus": 0, "include_dashboard": False,
                          "logging_level": "error", "log_to_driver": False}}


def federate_simulation(module: Any, task: Task, config: FederatedConfig,
                        clients: list[ClientData] | None = None, classes: int = 10) -> FederatedResult:
    """Federate ``module`` (torch, trained in place on a copy) over ``config.clients`` simulated
    clients holding parts of ``task``'s training split; returns the global model and the record."""
    require("flwr", "federated")
    from flwr.simulation import run_simulation

    from compactai.federated.apps import RunRecord, client_app, server_app

    config.validate()
    data = clients if clients is not None else split_clients(task.split("train"), config.clients, config.alpha(),
                                                             config.seed, config.holdout)
    template = copy.deepcopy(module).eval()
    initial = get_weights(template)

    def build_model() -> Any:
        return copy.deepcopy(template)

    record = RunRecord()
    server = server_app(config, initial, build_model, task.split("validation"), record)
    client = client_app(config, build_model, lambda partition, context: data[partition])
    run_simulation(server_app=server, client_app=client, num_supernodes=config.clients,
                   backend_config=client_resources(config))
    if record.final is None:
        raise TechniqueError("The Flower simulation ended without a global model (every round failed); "
                             "re-run with --debug to see Flower's log.")
    result_module = build_model()
    set_weights(result_module, record.final)
    test_split = task.split("test")
    round0 = build_model()
    return FederatedResult(module=result_module, rounds=record.rounds, test=evaluate(result_module, test_split),
                           round0_test=evaluate(round0, test_split), seconds=record.seconds,
                           clients=[{"client": i, "train_samples": len(c.train), "holdout_samples": len(c.holdout),
                                     "labels": c.label_counts(classes)} for i, c in enumerate(data)])


def clients_alone(module: Any, task: Task, config: FederatedConfig,
                  clients: list[ClientData] | None = None) -> list[dict[str, float]]:
    """The baseline federated learning must beat: each client trains the starting model on its own
    partition only, for as many epochs as it would train across all rounds; scored on the test split."""
    data = clients if clients is not None else split_clients(task.split("train"), config.clients, config.alpha(),
                                                             config.seed, config.holdout)
    scores = []
    for index, client in enumerate(data):
        own = copy.deepcopy(module)
        train_local(own, client.train, epochs=config.rounds * config.local_epochs, lr=config.lr,
                    batch_size=config.batch_size, seed=config.seed * 7919 + index)
        scores.append({"client": index, **evaluate(own, task.split("test"))})
    return scores


def mean_accuracy(scores: list[dict[str, float]]) -> float:
    return float(np.mean([s["accuracy"] for s in scores]))
