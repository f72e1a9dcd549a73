"""`compactai quantize` (being built)."""
