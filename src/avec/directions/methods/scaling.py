"""Giving a unit direction the magnitude of the data it came from.

Methods that find only a direction (PCA, probe) scale it to the mean projection of the pair
differences onto it, so a coefficient means about the same for every method: for mean_diff
that projection is exactly the vector's own norm.
"""

from __future__ import annotations

import torch


def scale_to_mean_projection(unit: torch.Tensor, diffs: torch.Tensor) -> torch.Tensor:
    unit = unit.double() / unit.double().norm()
    projection = (diffs.double() @ unit).mean()
    if projection < 0:  # orient so positives project higher than negatives
        unit, projection = -unit, -projection
    return (unit * projection).float()
