"""Augmented views of the training inputs that teacher and student see alike.

Distillation works best when the teacher labels exactly the input the student trains on
("consistent" teaching, Beyer et al. 2022, *Knowledge distillation: a good teacher is
patient and consistent*), and labelling many varied views teaches the student the teacher's
function between and around the training samples, not only at them.

A view of training sample ``i`` is a recipe: a pixel shift of its image and, with mixup, a
partner sample ``j`` with its own shift and the weight ``w >= 0.5`` of sample ``i`` in the
blend. A ``ViewBank`` holds ``count`` views per sample, drawn once from ``VIEW_SEED``
(independent of the run's seed, so runs with other seeds, or on labels alone, use the same
views and share the teacher's targets). The teacher labels every view once; each training
step gives every sample in the batch one of its views at random. Labels of blended views
are the blended one-hot labels, so training on labels alone sees the same inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

VIEW_SEED = 1_234

# augment="shift": fixed (rows, columns) shifts, images rolled (what wraps out comes back in)
FIXED_SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (-1, -1), (2, -1), (-2, 1), (1, -2), (-1, 2), (0, 2))
# augment="translate": random shifts of up to this fraction of the image's height and width,
# the border repeated into the uncovered pixels (a digit is not wrapped around)
TRANSLATE_FRACTION = 1 / 8


@dataclass
class ViewBank:
    """``count`` views of each of ``samples`` training inputs, as plain tensors."""

    shifts: torch.Tensor  # views x samples x 2 (rows, columns), int64
    wrap: bool  # True: roll the image; False: repeat the border
    partners: torch.Tensor | None = None  # views x samples: the mixup partner's index
    partner_shifts: torch.Tensor | None = None  # views x samples x 2
    weights: torch.Tensor | None = None  # views x samples: weight of the sample's own image

    @property
    def count(self) -> int:
        return int(self.shifts.shape[0])

    def inputs(self, data: torch.Tensor, index: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """The views ``view`` (one per sample) of the samples ``index`` of ``data``."""
        out = self.shift(data[index], self.shifts[view, index])
        if self.partners is None or self.partner_shifts is None or self.weights is None:
            return out
        partner = self.partners[view, index]
        other = self.shift(data[partner], self.partner_shifts[view, index])
        weight = self.weights[view, index].view(-1, *[1] * (out.dim() - 1))
        return weight * out + (1 - weight) * other

    def labels(self, labels: torch.Tensor, index: torch.Tensor, view: torch.Tensor, classes: int) -> torch.Tensor:
        """Class indices of the samples, or with mixup their blended one-hot labels (class probabilities)."""
        if self.partners is None or self.weights is None:
            return labels[index]
        weight = self.weights[view, index].unsqueeze(1)
        own = F.one_hot(labels[index], classes).float()
        other = F.one_hot(labels[self.partners[view, index]], classes).float()
        return weight * own + (1 - weight) * other

    def shift(self, images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        """Shift each image (``... x H x W``) by its own (rows, columns): exact pixel moves, no interpolation."""
        if images.dim() < 3 or not bool(shifts.any()):
            return images
        height, width = images.shape[-2:]
        rows = torch.arange(height).unsqueeze(0) - shifts[:, :1]  # samples x H: source row of each row
        cols = torch.arange(width).unsqueeze(0) - shifts[:, 1:]
        if self.wrap:
            rows, cols = rows % height, cols % width
        else:
            rows, cols = rows.clamp(0, height - 1), cols.clamp(0, width - 1)
        flat = images.reshape(len(images), -1, height, width)
        gathered = flat.gather(2, rows[:, None, :, None].expand(-1, flat.shape[1], -1, width))
        gathered = gathered.gather(3, cols[:, None, None, :].expand(-1, flat.shape[1], height, -1))
        return gathered.reshape(images.shape)


def fixed_shifts(count: int, samples: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """``FIXED_SHIFTS``, the same for every sample (``count`` is ignored: always 8 views)."""
    return torch.tensor(FIXED_SHIFTS).unsqueeze(1).expand(-1, samples, -1).clone()


def random_shifts(count: int, samples: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Uniform shifts of up to ``TRANSLATE_FRACTION`` of each side; view 0 is the image itself."""
    limit = torch.tensor([max(1, round(side * TRANSLATE_FRACTION)) for side in size])
    shifts = (torch.rand(count, samples, 2, generator=generator) * (2 * limit + 1)).long() - limit
    shifts[0] = 0
    return shifts


def no_shifts(count: int, samples: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    return torch.zeros(count, samples, 2, dtype=torch.long)


# name -> (draws views x samples x 2 shifts, images wrap around)
AUGMENTATIONS: dict[str, tuple[Callable[[int, int, tuple[int, int], torch.Generator], torch.Tensor], bool]] = {
    "none": (no_shifts, False),
    "shift": (fixed_shifts, True),
    "translate": (random_shifts, False),
}


def make_view_bank(augment: str, mixup: float, count: int, data: torch.Tensor) -> ViewBank | None:
    """The views of ``data`` (samples first) for ``augment`` and ``mixup`` (the Beta(m, m)
    concentration of the blend weight; 0: no mixup); None when neither is asked for."""
    if augment == "none" and mixup == 0:
        return None
    draw, wrap = AUGMENTATIONS[augment]
    samples = len(data)
    size = (int(data.shape[-2]), int(data.shape[-1])) if data.dim() >= 3 else (1, 1)
    generator = torch.Generator().manual_seed(VIEW_SEED)
    shifts = draw(count, samples, size, generator)
    if mixup == 0:
        return ViewBank(shifts, wrap)
    views = len(shifts)
    partner_shifts = draw(views, samples, size, generator)
    partner_shifts[0] = shifts[0]  # view 0 stays the unmixed sample (weight 1)
    partners = torch.randint(samples, (views, samples), generator=generator)
    draws = np.random.default_rng(VIEW_SEED).beta(mixup, mixup, size=(views, samples)).astype(np.float32)
    weights = torch.from_numpy(np.maximum(draws, 1 - draws))  # the sample's own image dominates its view
    weights[0] = 1.0
    return ViewBank(shifts, wrap, partners, partner_shifts, weights)
