"""A small real technique registered only for the search tests: it rounds weights to a
chosen number of significant bits and re-exports (quality and size really change with it)."""

from __future__ import annotations

import copy

import pytest
import torch

from compactai.techniques.base import TECHNIQUES, ChoiceParam, Context, Technique, register_technique


class RoundWeights(Technique):
    name = "test_round_weights"
    family = "quantize"
    space = {"bits": ChoiceParam((2, 4, 8), 8)}
    search_space = {"bits": ChoiceParam((2, 4, 8), 8)}
    quick = {"bits": 8}

    def _apply(self, handle, context: Context, params):
        module = copy.deepcopy(handle.module)
        with torch.no_grad():
            for p in module.parameters():
                scale = p.abs().max() / (2 ** (params["bits"] - 1) - 1) if p.numel() else 1.0
                p.copy_(torch.round(p / scale) * scale if scale > 0 else p)
        return handle.derive(module=module), {}


@pytest.fixture
def round_technique():
    register_technique(RoundWeights)
    yield RoundWeights
    TECHNIQUES.unregister(RoundWeights.name)
