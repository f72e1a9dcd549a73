"""Federated learning on Flower's simulation engine (issue 20): digits with Dirichlet label skew.

10 clients, alpha 0.3, 10 rounds, one local epoch per round, a small MLP from random init. For
each seed: the starting model's test accuracy (round 0), the mean test accuracy of the clients
trained alone on their own partition (as many epochs as the federated run), and the global model
of FedAvg, FedProx and FedAdam; plus one FedAvg run with Flower's server-side fixed-clipping DP
(stated clip and noise); ``--int8`` adds one with int8 update compression (bytes measured). Run it
under the benchmark lock:

    flock /tmp/compactai-bench.lock nice -n -10 .venv/bin/python benchmarks/federated.py

Prints a table and writes benchmarks/results/federated.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from compactai.examples import digits
from compactai.federated import FederatedConfig, split_clients
from compactai.federated.local import evaluate
from compactai.federated.run import clients_alone, federate_simulation, mean_accuracy
from compactai.techniques.distill.students import MLPStudent

RESULTS = Path(__file__).parent / "results" / "federated.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--strategies", default="fedavg,fedprox,fedadam")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dp-clip", type=float, default=2.0)
    parser.add_argument("--dp-noise", type=float, default=0.3)
    parser.add_argument("--fraction-evaluate", type=float, default=0.3,
                        help="clients scoring the global model each round (centralised evaluation runs every round)")
    parser.add_argument("--int8", action="store_true", help="also one FedAvg run with int8 update compression")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    console = Console(stderr=True)
    started = time.monotonic()
    task = digits.digits_task(digits.load_digits_splits())
    seeds = [int(s) for s in args.seeds.split(",")]
    strategies = args.strategies.split(",")
    runs: list[dict[str, Any]] = []

    def model(seed: int) -> Any:
        torch.manual_seed(seed)
        return MLPStudent(32 * 32, [args.hidden], 10).eval()

    def config(seed: int, strategy: str, **extra: Any) -> FederatedConfig:
        return FederatedConfig(clients=args.clients, rounds=args.rounds, strategy=strategy,
                               partition=f"label-skew:{args.alpha}", fraction_evaluate=args.fraction_evaluate,
                               seed=seed, **extra).validate()

    for seed in seeds:
        base = config(seed, "fedavg")
        data = split_clients(task.split("train"), base.clients, base.alpha(), seed, base.holdout)
        start = model(seed)
        round0 = evaluate(start, task.split("test"))["accuracy"]
        alone = mean_accuracy(clients_alone(start, task, base, clients=data))
        runs.append({"seed": seed, "run": "round 0", "test_accuracy": round0})
        runs.append({"seed": seed, "run": "clients alone (mean)", "test_accuracy": alone})
        console.print(f"seed {seed}: round 0 {round0:.4f}, clients alone {alone:.4f}")
        variants: list[tuple[str, FederatedConfig]] = [(s, config(seed, s)) for s in strategies]
        if seed == seeds[0]:
            variants.append((f"fedavg + DP (server, clip {args.dp_clip}, noise {args.dp_noise})",
                             config(seed, "fedavg", dp_clip=args.dp_clip, dp_noise=args.dp_noise)))
            if args.int8:
                variants.append(("fedavg + int8 updates", config(seed, "fedavg", compression="int8")))
        for label, settings in variants:
            t0 = time.monotonic()
            result = federate_simulation(start, task, settings, clients=data)
            runs.append({"seed": seed, "run": label, "test_accuracy": result.test["accuracy"],
                         "final_validation": result.rounds[-1]["centralised"]["accuracy"],
                         "bytes_up": sum(r["bytes_up"] for r in result.rounds),
                         "bytes_down": sum(r["bytes_down"] for r in result.rounds),
                         "seconds": round(time.monotonic() - t0, 1),
                         "validation_per_round": [r["centralised"]["accuracy"] for r in result.rounds]})
            console.print(f"seed {seed}: {label} test {result.test['accuracy']:.4f} ({runs[-1]['seconds']} s)")
    total = round(time.monotonic() - started, 1)
    table = Table(title=f"Federated digits: {args.clients} clients, Dirichlet alpha {args.alpha}, {args.rounds} rounds, "
                        f"MLP {args.hidden} (test accuracy; seeds {args.seeds})")
    for column in ("run", "mean", "min", "max", "seeds", "bytes up (total)", "seconds"):
        table.add_column(column, justify="left" if column == "run" else "right")
    summary = {}
    for label in dict.fromkeys(r["run"] for r in runs):
        rows = [r for r in runs if r["run"] == label]
        values = [r["test_accuracy"] for r in rows]
        summary[label] = {"mean": statistics.mean(values), "min": min(values), "max": max(values), "n": len(values)}
        table.add_row(label, f"{summary[label]['mean']:.4f}", f"{min(values):.4f}", f"{max(values):.4f}",
                      str(len(values)), f"{rows[0].get('bytes_up', 0):,}" if "bytes_up" in rows[0] else "-",
                      f"{statistics.mean(r['seconds'] for r in rows):.0f}" if "seconds" in rows[0] else "-")
    Console().print(table)
    Console().print(f"total {total} s on {os.cpu_count()} cores; load average {os.getloadavg()}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"settings": vars(args), "runs": runs, "summary": summary, "total_seconds": total,
                                   "loadavg": os.getloadavg(), "cpu_count": os.cpu_count()}, indent=2))


if __name__ == "__main__":
    main()
