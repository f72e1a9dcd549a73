"""The distill technique family (being built)."""
