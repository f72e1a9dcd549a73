"""`compactai distill` (being built)."""
