"""The trial runner: a recipe's steps applied in order, cached by content, without touching the caller's handle."""

from __future__ import annotations

import copy

from compactai import Accuracy, Split, Task
from compactai.search.trial import StepCache, apply_recipe


def test_apply_recipe_leaves_the_callers_handle_untouched(small_handle, round_technique, tmp_path):
    import numpy as np

    split = Split({"image": np.zeros((4, 1, 16, 16), np.float32)}, np.zeros(4, np.int64))
    task = Task("toy", Accuracy(), {"test": split})
    metadata, fingerprint = copy.deepcopy(small_handle.metadata), small_handle.fingerprint()
    recipe = [{"technique": "test_round_weights", "params": {"bits": 4}}]
    cache = StepCache()
    final, cached = apply_recipe(small_handle, task, recipe, tmp_path, cache=cache)
    assert small_handle.metadata == metadata and small_handle.fingerprint() == fingerprint
    assert final.metadata["macs"] > 0  # counted on the float model, carried to the result
    assert [step["technique"] for step in final.metadata["history"]] == ["test_round_weights"] and cached == 0
    again, cached = apply_recipe(small_handle, task, recipe, tmp_path, cache=cache)
    assert again is final and cached == 1 and small_handle.metadata == metadata
