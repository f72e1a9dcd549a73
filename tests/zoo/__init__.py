"""User-style models for tests, built from seeded random weights (no downloads)."""
