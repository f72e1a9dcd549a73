"""Federated learning on Flower: improve a compact model across many clients whose data stays local.

``federate(handle, task, config)`` runs Flower's ``ServerApp``/``ClientApp`` pair (``apps.py``)
on the simulation engine; ``deploy.py`` runs the same apps on Flower's deployment engine
(SuperLink + SuperNodes). Settings and their checks are in ``config.py``, data partitioning in
``partition.py``, what a client does in ``local.py``; ``output.py`` writes the output directory
(model.onnx, results.json, report.html) that ``compactai quantize`` and ``bundle`` read.
Flower is an optional extra (``compactai[federated]``); only ``apps.py`` and the engines import it.
"""

from compactai.federated.config import COMPRESSIONS, STRATEGIES, FederatedConfig
from compactai.federated.partition import ClientData, partition_indices, split_clients

__all__ = ["COMPRESSIONS", "STRATEGIES", "ClientData", "FederatedConfig", "partition_indices", "split_clients"]
