"""ActAdd (Turner et al. 2023): one prompt pair, every position.

The steering "vector" is a ``[T, d]`` block: the difference of the two prompts' activations at
each of their T positions (the shorter prompt padded at the end with space tokens to the same
length). It is injected at the front positions 0..T-1 of the prompt being steered.
``fit`` is model-free; :func:`actadd_token_lists` builds the padded token lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from avec.directions.methods.base import MethodDefaults


@dataclass(frozen=True)
class ActAdd(MethodDefaults):
    name: str = "actadd"
    reads: ClassVar[str] = "tokens"
    pairs_needed: ClassVar[int | None] = 1

    def fit(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """``positive``/``negative``: ``[T, d]`` activations of the two prompts, position by position."""
        if positive.shape != negative.shape or positive.dim() != 2:
            raise ValueError(f"ActAdd needs two [T, d] tensors of one shape, got "
                             f"{tuple(positive.shape)} and {tuple(negative.shape)}")
        return (positive.double() - negative.double()).float()


def actadd_token_lists(pos_ids: list[int], neg_ids: list[int], space_id: int
                       ) -> tuple[list[int], list[int]]:
    """Pad the shorter token list at the end with the space token, as the ActAdd paper does."""
    width = max(len(pos_ids), len(neg_ids))
    return (pos_ids + [space_id] * (width - len(pos_ids)),
            neg_ids + [space_id] * (width - len(neg_ids)))
