"""`compactai report`: HTML + JSON reports from measured results."""

from __future__ import annotations
