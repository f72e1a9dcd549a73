"""The prune technique family (being built)."""
