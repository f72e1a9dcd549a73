"""The Flower App components `compactai federate --engine deployment` submits to a SuperLink.

``server`` runs where the SuperLink runs; ``client`` runs on every SuperNode. Both rebuild the
run from its run config (settings, example, model spec): the SuperNode's ``partition-id`` and
``num-partitions`` (its ``--node-config``) say which part of the example's training split is its own.
The components sit in the CLI layer because they load built-in examples' data.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from compactai.federated.apps import RunRecord, client_app, run_server
from compactai.federated.config import FederatedConfig
from compactai.federated.deploy import load_initial, save_record
from compactai.federated.partition import ClientData, split_clients


def _config(run_config: dict[str, Any]) -> FederatedConfig:
    return FederatedConfig(**json.loads(str(run_config["config"]))).validate()


@functools.lru_cache(maxsize=4)
def _example(name: str) -> Any:
    from compactai.examples import load_example

    return load_example(name)


def _task(example: str) -> Any:
    return _example(example).task


@functools.lru_cache(maxsize=4)
def _architecture(example: str, spec: str, seed: int) -> Any:
    from compactai.cli._federate_run import starting_module

    return starting_module(None, spec, _example(example).handle, seed)[0]


def _build_model(example: str, spec: str, seed: int) -> Any:
    import copy

    return copy.deepcopy(_architecture(example, spec, seed))


@functools.lru_cache(maxsize=4)
def _partitions(example: str, config_json: str, clients: int) -> list[ClientData]:
    config = FederatedConfig(**json.loads(config_json))
    return split_clients(_task(example).split("train"), clients, config.alpha(), config.seed, config.holdout)


server = ServerApp()


@server.main()
def _server_main(grid: Grid, context: Context) -> None:
    run = dict(context.run_config)
    config = _config(run)
    work = Path(str(run["work-dir"]))
    record = RunRecord()
    example, spec, seed = str(run["example"]), str(run["model-spec"]), config.seed
    run_server(grid, config, load_initial(work), lambda: _build_model(example, spec, seed),
               _task(str(run["example"])).split("validation"), record)
    save_record(work, record)


def _client_data(partition: int, context: Context) -> ClientData:
    run = dict(context.run_config)
    clients = int(context.node_config.get("num-partitions", _config(run).clients))
    return _partitions(str(run["example"]), str(run["config"]), clients)[partition]


def _make_client() -> ClientApp:
    # The ClientApp's mods (compression, DP clipping) depend on the run's settings, which a
    # SuperNode learns only from the message's context: build the configured app per message.
    app = ClientApp()

    @app.train()
    def train(msg: Any, context: Context) -> Any:
        return _configured(context)(msg, context)

    @app.evaluate()
    def evaluate(msg: Any, context: Context) -> Any:
        return _configured(context)(msg, context)

    return app


def _configured(context: Context) -> Any:
    run = dict(context.run_config)
    config = _config(run)
    example, spec = str(run["example"]), str(run["model-spec"])
    return client_app(config, lambda: _build_model(example, spec, config.seed), _client_data)


client = _make_client()
