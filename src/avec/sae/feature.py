"""An SAE latent as a direction: the latent that best marks the positive activations against
the negative ones (:func:`avec.sae.evaluate.latent_scores`; by default its activation
difference weighted by its firing-rate difference), picked from the same pairs every other
method sees (Templeton et al. 2024 style feature steering).

The direction is the latent's decoder row. ``avec compare`` steers it two ways: added like any
vector (method ``sae``), or by clamping the latent inside the SAE with the error term kept
(method ``sae_clamp``, :func:`avec.sae.steer_features`). For sentence pairs it scores each
token's latents averaged over the text (``fit_latents``); for A/B pools it encodes the one
activation read per text (``fit``). The SAE itself is trained elsewhere (``avec sae train``);
its data cost is reported separately by the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from avec.directions.methods.base import MethodDefaults, check_pair_tensors


@dataclass
class SAEFeature(MethodDefaults):
    """Method ``sae``: the picked latent's decoder row, added like any direction."""

    reads: ClassVar[str] = "latents"
    needs_sae: ClassVar[bool] = True
    sae: Any  # avec.sae.SparseAutoencoder
    by: str = "selective"  # avec.sae.evaluate.RANKINGS
    name: str = "sae"
    latent_: int | None = field(default=None, init=False)
    score_: float | None = field(default=None, init=False)

    def info(self) -> dict[str, Any]:
        return {"latent": self.latent_, "selection_score": self.score_}

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
        from avec.sae.evaluate import latent_scores

        check_pair_tensors(positive, negative)
        scores = latent_scores(positive, negative, self.by)  # type: ignore[arg-type]
        self.latent_ = int(scores.argmax())
        self.score_ = float(scores[self.latent_])
        return self.sae.W_dec[self.latent_].detach().float().cpu().clone()


@dataclass
class SAEClamp(SAEFeature):
    """Method ``sae_clamp``: the same latent, clamped inside the SAE with its error term kept
    (:func:`avec.sae.steer_features`) instead of added."""

    applies: ClassVar[str] = "clamp"
    name: str = "sae_clamp"


SAE_METHODS: dict[str, type] = {"sae": SAEFeature, "sae_clamp": SAEClamp}
"""The SAE-feature methods; both need ``sae=``."""
