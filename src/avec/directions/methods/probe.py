"""Linear probe: L2-regularised logistic regression, positive vs negative activations.

Features are standardised (zero mean, unit variance per dimension) before fitting, as a probe
should be; the weight vector is mapped back to activation space (w / sigma, since
w . (x - mu) / sigma = (w / sigma) . x + const), then scaled to the mean projection of the pair
differences. This is a real probe, not difference-in-means under another name: on data with
anisotropic noise the two directions differ (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from avec.directions.methods.base import MethodDefaults, check_pair_tensors
from avec.directions.methods.scaling import scale_to_mean_projection


@dataclass(frozen=True)
class Probe(MethodDefaults):
    name: str = "probe"
    C: float = 1.0  # inverse regularisation strength, as in scikit-learn
    max_iter: int = 200

    def fit(self, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        check_pair_tensors(positive, negative)
        x = torch.cat([positive, negative]).double()
        y = torch.cat([torch.ones(len(positive)), torch.zeros(len(negative))]).double()
        mu, sigma = x.mean(0), x.std(0, unbiased=False)
        sigma = torch.where(sigma > 1e-12, sigma, torch.ones_like(sigma))
        z = (x - mu) / sigma
        w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros((), dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=self.max_iter,
                                tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                z @ w + b, y, reduction="sum") + (w @ w) / (2 * self.C)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        direction = w.detach() / sigma
        if direction.norm() == 0:
            raise ValueError("the probe found no separating direction (all weights zero)")
        return scale_to_mean_projection(direction, positive.double() - negative.double())
