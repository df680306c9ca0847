"""PCA of the pair differences, *uncentered*.

Centering the differences before PCA subtracts their mean, which is exactly the mean-difference
direction, so a centred PCA finds the direction of largest *variation between pairs* instead of
the shared behaviour direction (a known bug in two public tools). The uncentered first singular
vector of the difference matrix keeps it. The sign is chosen so positives project higher, and
the direction is scaled to the mean projection of the differences (see ``scaling``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avec.directions.methods.base import MethodDefaults, check_pair_tensors
from avec.directions.methods.scaling import scale_to_mean_projection


@dataclass(frozen=True)
class PCA(MethodDefaults):
    name: str = "pca"
    center: bool = False  # True only to reproduce the centred variant for comparison

    def fit(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        check_pair_tensors(positive, negative)
        diffs = positive.double() - negative.double()
        x = diffs - diffs.mean(0) if self.center else diffs
        if x.abs().max() == 0:
            raise ValueError("all pair differences are zero; PCA has no direction to find")
        _u, _s, vh = torch.linalg.svd(x, full_matrices=False)
        return scale_to_mean_projection(vh[0], diffs)
