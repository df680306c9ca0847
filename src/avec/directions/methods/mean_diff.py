"""Mean difference (CAA, Rimsky et al. 2024): mean over pairs of positive minus negative."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avec.directions.methods.base import MethodDefaults, check_pair_tensors


@dataclass(frozen=True)
class MeanDiff(MethodDefaults):
    name: str = "mean_diff"

    def fit(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        check_pair_tensors(positive, negative)
        return (positive.double() - negative.double()).mean(0).float()
