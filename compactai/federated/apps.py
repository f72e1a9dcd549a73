"""The Flower ``ServerApp`` and ``ClientApp`` of a federated run.

The same two apps run on Flower's simulation engine (one machine, Ray actors as clients) and on
its deployment engine (a SuperLink and SuperNodes on real devices). The server side is one of
Flower's strategies, optionally wrapped in Flower's differential-privacy wrapper, inside
:class:`Recorder`, which keeps per-round figures (bytes each way, per-client metrics) and turns
compressed client updates back into weights before the strategy (and DP) sees them. Update
compression on the client is a Flower mod, placed outside DP's clipping mod so clipping sees
true weights.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp import strategy as flwr_strategy

from compactai.federated.config import FederatedConfig
from compactai.federated.local import (
    decode_update,
    encode_update,
    evaluate,
    get_weights,
    set_weights,
    train_local,
)
from compactai.federated.partition import ClientData
from compactai.tasks import Split

log = logging.getLogger(__name__)

ModelFactory = Callable[[], Any]  # a fresh torch module of the run's architecture
ClientDataFn = Callable[[int, Context], ClientData]  # partition id -> that client's data


def to_record(weights: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in weights.items()})


def number(value: Any) -> float:
    """A scalar of a Flower record (typed as a union of every value kind a record can hold)."""
    return float(value)


def arrays_of(message: Message) -> ArrayRecord:
    return message.content.array_records["arrays"]


def metrics_of(message: Message) -> MetricRecord:
    return message.content.metric_records["metrics"]


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {name: record[name].numpy() for name in record}


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialised arrays (what travels, headers included)."""
    return int(sum(len(record[name].data) for name in record))


def make_strategy(config: FederatedConfig) -> Any:
    """Flower's strategy for ``config`` (FedProx sends its mu to clients in the train config),
    wrapped in Flower's fixed-clipping DP when asked."""
    sampled = int(config.fraction_fit * config.clients)
    common: dict[str, Any] = {"fraction_train": config.fraction_fit, "fraction_evaluate": config.fraction_evaluate,
              "min_train_nodes": sampled, "min_evaluate_nodes": int(config.fraction_evaluate * config.clients),
              "min_available_nodes": config.clients}
    inner: flwr_strategy.Strategy
    if config.strategy == "fedprox":
        inner = flwr_strategy.FedProx(proximal_mu=config.proximal_mu, **common)
    elif config.strategy == "fedadam":
        inner = flwr_strategy.FedAdam(eta=config.server_lr, eta_l=config.lr, **common)
    elif config.strategy == "fedmedian":
        inner = flwr_strategy.FedMedian(**common)
    else:
        inner = flwr_strategy.FedAvg(**common)
    if config.dp_clip is None or config.dp_noise is None:
        return inner
    wrapper = (flwr_strategy.DifferentialPrivacyServerSideFixedClipping if config.dp_side == "server"
               else flwr_strategy.DifferentialPrivacyClientSideFixedClipping)
    return wrapper(inner, noise_multiplier=config.dp_noise, clipping_norm=config.dp_clip, num_sampled_clients=sampled)


@dataclass
class RunRecord:
    """What the server saw, as plain data: one entry per round, and the final weights."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, np.ndarray] | None = None
    seconds: float = 0.0

    def round(self, number: int) -> dict[str, Any]:
        while len(self.rounds) <= number:
            self.rounds.append({"round": len(self.rounds), "bytes_down": 0, "bytes_up": 0, "clients": {}})
        return self.rounds[number]


class Recorder(flwr_strategy.Strategy):
    """Delegates to a Flower strategy; decodes compressed updates and records each round."""

    def __init__(self, inner: Any, compression: str, record: RunRecord) -> None:
        self.inner, self.compression, self.record = inner, compression, record
        self.start_weights: dict[str, np.ndarray] = {}

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.start_weights = from_record(arrays)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self.record.round(server_round)["bytes_down"] += sum(record_bytes(arrays_of(m)) for m in messages)
        self.record.round(server_round)["clients_trained"] = len(messages)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        entry = self.record.round(server_round)
        for message in replies:
            if message.has_error():
                continue
            packed = arrays_of(message)
            entry["bytes_up"] += record_bytes(packed)
            weights = decode_update(from_record(packed), self.start_weights, self.compression)
            message.content["arrays"] = to_record(weights)
            metrics = metrics_of(message)
            entry["clients"].setdefault(int(number(metrics["client"])), {})["train_loss"] = number(metrics["train_loss"])
        entry["failures"] = sum(1 for m in replies if m.has_error())
        aggregated: tuple[ArrayRecord | None, MetricRecord | None] = self.inner.aggregate_train(server_round, replies)
        return aggregated

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        self.record.round(server_round)["bytes_down"] += sum(record_bytes(arrays_of(m)) for m in messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        entry = self.record.round(server_round)
        for message in replies:
            if not message.has_error():
                metrics = metrics_of(message)
                entry["clients"].setdefault(int(number(metrics["client"])), {}).update(
                    accuracy=number(metrics["accuracy"]), loss=number(metrics["loss"]))
        aggregated: MetricRecord | None = self.inner.aggregate_evaluate(server_round, replies)
        if aggregated is not None:
            entry["federated"] = {"accuracy": number(aggregated["accuracy"]), "loss": number(aggregated["loss"])}
        return aggregated


def run_server(grid: Grid, config: FederatedConfig, initial: dict[str, np.ndarray], build_model: ModelFactory,
               validation: Split, record: RunRecord) -> None:
    """The ServerApp's work: Flower's strategy from ``initial`` weights for ``config.rounds`` rounds,
    with centralised evaluation on ``validation`` before the first round and after each; fills ``record``."""
    started = time.monotonic()
    strategy = Recorder(make_strategy(config), config.compression, record)
    model = build_model()

    def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_weights(model, from_record(arrays))
        scores = evaluate(model, validation)
        record.round(server_round)["centralised"] = {"accuracy": scores["accuracy"], "loss": scores["loss"]}
        return MetricRecord({"accuracy": scores["accuracy"], "loss": scores["loss"]})

    train_config = ConfigRecord({"lr": config.lr, "local-epochs": config.local_epochs,
                                 "batch-size": config.batch_size, "seed": config.seed})
    result = strategy.start(grid=grid, initial_arrays=to_record(initial), num_rounds=config.rounds,
                            train_config=train_config, evaluate_fn=central)
    record.final = from_record(result.arrays) if result.arrays is not None else None
    record.seconds = round(time.monotonic() - started, 2)


def server_app(config: FederatedConfig, initial: dict[str, np.ndarray], build_model: ModelFactory,
               validation: Split, record: RunRecord) -> ServerApp:
    """A ServerApp that runs :func:`run_server` (the simulation engine runs it in this process)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, config, initial, build_model, validation, record)

    return app


def client_app(config: FederatedConfig, build_model: ModelFactory, client_data: ClientDataFn) -> ClientApp:
    """The ClientApp: trains the received weights on its partition (``train``) and scores them on
    its held-out data (``evaluate``). With DP on the client side, Flower's clipping mod clips the
    update; with compression, :func:`compression_mod` packs it after clipping."""
    mods: list[Any] = []
    if config.compression != "none":
        mods.append(compression_mod(config.compression))
    if config.dp_clip is not None and config.dp_side == "client":
        mods.append(fixedclipping_mod)
    app = ClientApp(mods=mods)

    def received(msg: Message, context: Context) -> tuple[int, ClientData, Any]:
        """(this client's partition id, its data, a model holding the weights ``msg`` carries)."""
        client = int(context.node_config["partition-id"])
        data = client_data(client, context)
        model = build_model()
        set_weights(model, from_record(arrays_of(msg)))
        return client, data, model

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client, data, model = received(msg, context)
        settings = msg.content.config_records["config"]
        mu = number(settings["proximal-mu"]) if "proximal-mu" in settings else 0.0
        seed = int(number(settings["seed"])) * 7919 + int(number(settings["server-round"])) * 101 + client
        metrics = train_local(model, data.train, epochs=int(number(settings["local-epochs"])),
                              lr=number(settings["lr"]), batch_size=int(number(settings["batch-size"])),
                              seed=seed, proximal_mu=mu)
        content = RecordDict({"arrays": to_record(get_weights(model)),
                              "metrics": MetricRecord({**metrics, "client": client})})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def score(msg: Message, context: Context) -> Message:
        client, data, model = received(msg, context)
        metrics = evaluate(model, data.holdout)
        return Message(content=RecordDict({"metrics": MetricRecord({**metrics, "client": client})}), reply_to=msg)

    return app


def compression_mod(mode: str) -> Callable[[Message, Context, Any], Message]:
    """A Flower client mod that sends the training reply's weights as a compressed delta."""

    def mod(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        if reply.has_error() or msg.metadata.message_type != "train":
            return reply
        start = from_record(arrays_of(msg))
        reply.content["arrays"] = to_record(encode_update(from_record(arrays_of(reply)), start, mode))
        return reply

    return mod
