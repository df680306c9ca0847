"""A random direction with the norm of the mean-difference vector: the control every table needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from avec.directions.methods.base import MethodDefaults, check_pair_tensors


@dataclass(frozen=True)
class RandomDirection(MethodDefaults):
    name: str = "random"
    seed: int = 0

    def info(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def fit(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        check_pair_tensors(positive, negative)
        norm = (positive.double() - negative.double()).mean(0).norm()
        g = torch.Generator().manual_seed(self.seed)
        direction = torch.randn(positive.shape[1], generator=g, dtype=torch.float64)
        return (direction / direction.norm() * norm).float()
