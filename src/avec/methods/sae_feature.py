"""An SAE latent as a direction: the latent whose activation differs most between the positive
and the negative activations, steered along its decoder row (Templeton et al. 2024 style
feature steering, picked from the same pairs every other method sees).

``avec compare`` scores the latents of sentence pairs per token and averages them over each
text (``fit_latents``); for A/B pools it encodes the one activation read per text (``fit``). The SAE itself is trained
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
        """Pick the latent from activations (one row per text), encoded here."""
        check_pair_tensors(positive, negative)
        w = self.sae.W_dec
        return self.fit_latents(self.sae.encode(positive.to(w.dtype)),
                                self.sae.encode(negative.to(w.dtype)))

    @torch.no_grad()
    def fit_latents(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """Pick the latent from latent activations already computed per text (e.g. the mean of
        each token's latents, which is what ``avec compare`` uses for sentence pairs)."""
        check_pair_tensors(positive, negative)
        w = self.sae.W_dec
        diff = positive.mean(0) - negative.mean(0)
        self.latent_ = int(diff.argmax())
        self.score_ = float(diff[self.latent_])
        return w[self.latent_].detach().float().cpu().clone()
