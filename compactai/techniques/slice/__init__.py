"""Model slicing: cut an ONNX graph into parts that run on different devices.

``graph`` finds the cuts and extracts head/tail models, ``placement`` measures every cut and
chooses where to split for a stated network, ``partition`` splits a model into K parts under
per-device memory limits, ``runner`` runs a head locally and its tail on a KServe v2 server.
"""

from compactai.techniques.slice.graph import COMPRESSIONS, Cut, Graph, InvalidCutError

__all__ = ["COMPRESSIONS", "Cut", "Graph", "InvalidCutError"]
