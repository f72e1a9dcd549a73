"""`compactai bundle`, `keygen`, `verify`, `update` (being built)."""
