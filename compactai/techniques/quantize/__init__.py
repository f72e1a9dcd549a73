"""The quantize technique family (being built)."""
