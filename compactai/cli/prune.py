"""`compactai prune` (being built)."""
