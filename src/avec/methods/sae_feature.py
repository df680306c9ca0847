"""An SAE latent as a direction: the latent whose activation differs most between the positive
and the negative activations, steered along its decoder row (Templeton et al. 2024 style
feature steering, picked from the same pairs every other method sees).

The activations ``avec compare`` passes are one row per text (by default the mean over its
tokens), so the latent scores are those of the encoded rows. The SAE itself is trained
elsewhere (``avec sae train``); its data cost is reported separately by the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from avec.methods.base import check_pair_tensors


@dataclass
class SAEFeature:
    sae: Any  # avec.sae.SparseAutoencoder
    name: str = "sae"
    latent_: int | None = field(default=None, init=False)
    score_: float | None = field(default=None, init=False)

    @torch.no_grad()
    def fit(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        check_pair_tensors(positive, negative)
        w = self.sae.W_dec
        diff = (self.sae.encode(positive.to(w.dtype)).mean(0)
                - self.sae.encode(negative.to(w.dtype)).mean(0))
        self.latent_ = int(diff.argmax())
        self.score_ = float(diff[self.latent_])
        return w[self.latent_].detach().float().cpu().clone()
