"""The output directory of a federated run: model.onnx, results.json, report.html.

The layout is every command's (``compactai.results``), so ``compactai quantize OUT/model.onnx``
and ``compactai bundle OUT`` take it like any other output. The ``federated`` section of
results.json holds the settings (strategy, privacy), one entry per round (centralised and
federated accuracy and loss, bytes each way, per-client figures) and the baselines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from compactai.federated.config import FederatedConfig
from compactai.models.handle import ModelHandle
from compactai.models.load import load_model
from compactai.report.federated import write_federated_report
from compactai.results import save_model, write_results
from compactai.tasks import Task


def handle_of(module: Any, task: Task, name: str) -> ModelHandle:
    """A torch handle of the federated module, with one test sample as example input."""
    sample = task.split("test").take(1).inputs
    return load_model(module, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sample.items()},
                      name=name, output_names=["logits"])


def federated_section(config: FederatedConfig, engine: str, rounds: list[dict[str, Any]], test: dict[str, float],
                      round0_test: dict[str, float], clients: list[dict[str, Any]],
                      alone: list[dict[str, float]] | None, seconds: float) -> dict[str, Any]:
    """results.json's ``federated`` section, as plain data."""
    last = {}
    for entry in rounds:
        for client, figures in entry.get("clients", {}).items():
            if "accuracy" in figures:
                last[int(client)] = figures["accuracy"]
    alone_by_client = {int(a["client"]): a["accuracy"] for a in alone or []}
    table = [{**c, "accuracy": last.get(c["client"]), "alone_accuracy": alone_by_client.get(c["client"])}
             for c in clients]
    plain_rounds = [{**e, "clients": {str(k): v for k, v in sorted(e.get("clients", {}).items())}} for e in rounds]
    mean_alone = float(np.mean(list(alone_by_client.values()))) if alone_by_client else None
    summary = (f"Test accuracy {test['accuracy']:.4f} after {config.rounds} rounds of {config.strategy} over "
               f"{config.clients} clients (start {round0_test['accuracy']:.4f}"
               + (f", clients trained alone {mean_alone:.4f} on average" if mean_alone is not None else "") + ").")
    return {
        "engine": engine, "config": config.to_dict(), "privacy": config.privacy,
        "secure_aggregation": config.secagg, "rounds": plain_rounds, "test": test, "round0_test": round0_test,
        "clients": table,
        "clients_alone": {"mean_accuracy": mean_alone, "clients": alone} if alone else None,
        "bytes_down_total": int(sum(e.get("bytes_down", 0) for e in rounds)),
        "bytes_up_total": int(sum(e.get("bytes_up", 0) for e in rounds)),
        "seconds": seconds, "summary": summary,
    }


def write_federated_output(out: Path, handle: ModelHandle, section: dict[str, Any], *, seed: int,
                           source: dict[str, Any]) -> dict[str, Path]:
    """Write model.onnx (exported with the parity check), results.json and report.html."""
    import json

    model_path = save_model(handle, out)
    quality = {"metric": "accuracy", "value": section["test"]["accuracy"],
               "baseline": section["round0_test"]["accuracy"], "split": "test"}
    results_path = write_results(out, "federate", handle, seed=seed, source=source, quality=quality,
                                 federated=section)
    report_path = write_federated_report(json.loads(results_path.read_text()), out / "report.html")
    return {"model": model_path, "results": results_path, "report": report_path}
