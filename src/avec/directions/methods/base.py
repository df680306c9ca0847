"""The contract every direction-finding method follows.

A method is model-free: ``fit(positive, negative)`` takes two ``[N, d]`` activation tensors
(row i of each from the same contrast pair) and returns one ``[d]`` direction, which points from
negative to positive behaviour.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Method(Protocol):
    name: str

    def fit(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor: ...


def check_pair_tensors(positive: torch.Tensor, negative: torch.Tensor) -> None:
    if positive.shape != negative.shape or positive.dim() != 2:
        raise ValueError(f"expected two [N, d] tensors of the same shape, got "
                         f"{tuple(positive.shape)} and {tuple(negative.shape)}")
    if positive.shape[0] == 0:
        raise ValueError("no pairs to fit a direction on")
