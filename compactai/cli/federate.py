"""`compactai federate`: train a compact model across many clients with Flower; data stays on them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from compactai.cli._common import JSON_OPTION, Output, app, check_output_dir, table


@app.command()
def federate(
    model: str | None = typer.Argument(
        None, help="Starting model: an output directory or model.onnx of prune/distill (float ONNX), or a .pt2; "
                   "default: --model SPEC, a fresh architecture."),
    example: str | None = typer.Option(None, "--example", "-e", help="Built-in example whose data the clients hold: digits."),
    data: Path | None = typer.Option(None, "--data", help="Your own labelled data instead of --example: an .npz with "
                                     "'train/<input>', 'validation/...', 'test/...' arrays and '<split>/labels' (as for "
                                     "quantize, plus a train split); needs MODEL. Simulation engine only."),
    model_spec: str = typer.Option("mlp:64", "--model", "-m",
                                   help="Architecture when no MODEL is given: mlp:64 | digits-cnn:8,16,32 | width:0.25 "
                                        "(the example's model pruned) | a .pt2 file."),
    clients: int = typer.Option(10, "--clients", "-n", help="Number of clients (SuperNodes), at least 2."),
    rounds: int = typer.Option(10, "--rounds", "-r", help="Federated rounds, at least 1."),
    strategy: str = typer.Option("fedavg", "--strategy", "-s", help="Flower strategy: fedavg, fedprox, fedadam or fedmedian."),
    fraction_fit: float = typer.Option(1.0, "--fraction-fit", help="Fraction of clients that train each round."),
    fraction_evaluate: float = typer.Option(1.0, "--fraction-evaluate",
                                            help="Fraction of clients that score the global model each round."),
    partition: str = typer.Option("label-skew:0.3", "--partition",
                                  help="iid, or label-skew:ALPHA (Dirichlet over labels; smaller alpha = more skew)."),
    local_epochs: int = typer.Option(1, "--local-epochs", "-E", help="Epochs each client trains per round."),
    lr: float = typer.Option(0.05, "--lr", help="Client learning rate (SGD, momentum 0.9)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Client batch size."),
    proximal_mu: float = typer.Option(0.1, "--proximal-mu", help="FedProx: weight of the proximal term."),
    server_lr: float = typer.Option(0.03, "--server-lr", help="FedAdam: server learning rate."),
    dp_clip: float | None = typer.Option(None, "--dp-clip", help="Differential privacy: L2 clipping norm of updates."),
    dp_noise: float | None = typer.Option(None, "--dp-noise", help="Differential privacy: Gaussian noise multiplier."),
    dp_side: str = typer.Option("server", "--dp-side", help="Who clips: server or client (Flower's fixed-clipping wrappers)."),
    compress: str = typer.Option("none", "--compress", help="Client update compression: none, fp16 or int8 deltas."),
    secagg: bool = typer.Option(False, "--secagg", help="Flower's SecAgg+ secure aggregation (see docs/federated.md)."),
    alone: bool = typer.Option(True, "--alone/--no-alone",
                               help="Also train each client alone on its own data, the baseline to beat."),
    engine: str = typer.Option("simulation", "--engine", help="simulation (one machine) or deployment (a running SuperLink)."),
    superlink: str | None = typer.Option(None, "--superlink", help="Deployment: the SuperLink's Control API address HOST:PORT."),
    insecure: bool = typer.Option(False, "--insecure", help="Deployment: plain gRPC (loopback tests only)."),
    seed: int = typer.Option(0, "--seed", help="Seed for partitions, initialisation and client order."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Output directory (default: out/federate)."),
    json_output: bool = JSON_OPTION,
) -> None:
    """Federated learning on Flower: each client trains the global model on its own partition of the
    data (Dirichlet label skew for non-IID), a Flower strategy aggregates the updates, and the global
    model is scored every round on the validation split (centralised) and on clients' held-out data
    (federated). Optional: Flower's fixed-clipping differential privacy, fp16/int8 update
    compression (bytes per round measured). Writes OUTPUT/model.onnx, results.json and report.html,
    ready for `compactai quantize` and `compactai bundle`."""
    from compactai.cli._federate_run import run_federate
    from compactai.errors import BadInputError, MissingDependencyError, ParameterError, require
    from compactai.federated.config import ENGINES, FederatedConfig

    out = Output(json_output)
    config = FederatedConfig(
        clients=clients, rounds=rounds, strategy=strategy.lower(), fraction_fit=fraction_fit,
        fraction_evaluate=fraction_evaluate, partition=partition, local_epochs=local_epochs, lr=lr,
        batch_size=batch_size, proximal_mu=proximal_mu, server_lr=server_lr, dp_clip=dp_clip, dp_noise=dp_noise,
        dp_side=dp_side, compression=compress, secagg=secagg, seed=seed).validate()
    if engine not in ENGINES:
        raise BadInputError(f"Unknown --engine {engine!r}; choose simulation or deployment.")
    if engine == "deployment" and not superlink:
        raise BadInputError("--engine deployment needs --superlink HOST:PORT (the SuperLink's Control API, "
                            "default port 9093); see docs/federated.md.")
    if engine == "deployment" and model is not None:
        raise BadInputError("The deployment engine starts from --model SPEC (every SuperNode rebuilds the "
                            "architecture from it); give no MODEL, or use --engine simulation.")
    if (example is None) == (data is None):
        raise BadInputError("federate needs the clients' data from exactly one of --example digits or --data FILE.npz "
                            "(each simulated client holds a partition of its training split).")
    if data is not None and model is None:
        raise BadInputError("--data needs MODEL (a .onnx, .pt2 or prune/distill output directory) to start from: "
                            "--model SPEC architectures are built for the built-in examples.")
    if data is not None and engine == "deployment":
        raise BadInputError("--data runs on the simulation engine; on the deployment engine each SuperNode loads its "
                            "own data (see docs/federated.md).")
    if secagg:
        raise ParameterError(
            "--secagg is not available: in the installed Flower, SecAgg+ (SecAggPlusWorkflow + secaggplus_mod) "
            "runs only with the legacy workflow API, not with the message-API strategies federate uses; "
            "run without --secagg (see docs/federated.md).")
    output = output or Path("out/federate")
    check_output_dir(output)
    try:
        require("flwr", "federated")
    except MissingDependencyError:
        raise MissingDependencyError(
            "compactai federate needs Flower, which is not installed here. In a checkout run `make "
            "install-federated` and use build/fed-venv/bin/compactai (Flower pins older protobuf/rich/typer, so "
            "it gets its own venv); elsewhere: pip install -c constraints.txt 'compactai[federated]' in a new venv") from None
    with out.progress(f"Federating over {clients} clients ({engine} engine)") as say:
        summary = run_federate(model, example, model_spec, config, engine=engine, superlink=superlink,
                               insecure=insecure, alone=alone, output=output, progress=say, data=data)
    print_summary(out, summary)
    out.emit(summary)


def print_summary(out: Output, summary: dict[str, Any]) -> None:
    rows: list[list[Any]] = []
    for entry in summary["rounds"]:
        central, fed = entry.get("centralised") or {}, entry.get("federated") or {}
        rows.append([entry["round"], central.get("accuracy"), fed.get("accuracy"), entry.get("bytes_down"),
                     entry.get("bytes_up")])
    out.console.print(table(f"Federated {summary['strategy']} over {summary['clients']} clients",
                            ["round", "centralised acc", "federated acc", "bytes down", "bytes up"], rows))
    alone = summary.get("clients_alone_mean")
    out.console.print(
        f"test accuracy: start {summary['round0_test_accuracy']:.4f} -> federated {summary['test_accuracy']:.4f}"
        + (f" (clients alone: {alone:.4f} on average)" if alone is not None else "")
        + f"; model: {summary['model']}", highlight=False)
