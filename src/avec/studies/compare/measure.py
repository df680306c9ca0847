"""What every row of a comparison shares, steering or fine-tuning: the methods, a cell's seeded
subset of pairs, a direction scaled to the common norm, the effects of a model under vectors x
coefficients, and a row's best effect within the KL budget.

:mod:`~avec.studies.compare.run` (the steering rows) and :mod:`~avec.studies.compare.finetuned`
(the ``lora`` and ``lora+mean_diff`` rows) both build on these, so they measure alike.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from avec.directions.methods import METHODS
from avec.directions.methods.base import Method, make_method
from avec.evaluate.ab import ab_variants
from avec.evaluate.concepts import EmbeddingJudge, keyword_rate
from avec.generation.hf import variant_completions
from avec.models.model import Model
from avec.sae.feature import SAE_METHODS
from avec.studies.compare.settings import CompareSettings, Task
from avec.vector import SteeringVector

REGISTRY: dict[str, type] = {**METHODS, **SAE_METHODS}
"""Every steering method ``avec compare`` runs: the core ones and the SAE-feature ones."""


def scaled(direction: torch.Tensor, norm: float) -> torch.Tensor:
    """``direction`` rescaled to ``norm`` (an ActAdd block: its mean row norm)."""
    if direction.dim() == 2:  # ActAdd block: mean row norm = the common norm
        current = direction.norm(dim=-1).mean()
    else:
        current = direction.norm()
    if current == 0:
        raise ValueError("a method returned the zero direction; it cannot be scaled")
    return direction * (norm / current)


def subset(pool: int, n: int, seed: int) -> list[int]:
    """The indices of a (n, seed) cell's pairs: the same for every method of that cell."""
    return random.Random(10_007 * seed + n).sample(range(pool), n)


def fitter(name: str, settings: CompareSettings, sae: Any, seed: int) -> Method:
    """A fresh instance of the steering method ``name`` for one cell."""
    return make_method(REGISTRY, name, context={"seed": seed, "sae": sae,
                                                 "by": settings.sae_select})


def best_row(cell: dict[str, Any], eff: list[float], kls: list[float], said: Any,
             coefs: Sequence[Any], baseline: float, budget: float) -> dict[str, Any]:
    """A cell's row: its effects and KLs per knob value (``coefs``: coefficients, LoRA scales,
    or (scale, coefficient) pairs) and the best effect within the budget. The first value is
    where the intervention starts from, the unchanged model (coefficient 0, scale 0, or (0, 0);
    KL 0 up to float tolerance), and is always allowed, so every row has a best."""
    ok = [(e - baseline, c, k) for i, (e, c, k) in enumerate(zip(eff, coefs, kls))
          if i == 0 or k <= budget]
    best = max(ok, key=lambda x: x[0])
    row = {**cell, "effects": eff, "kl": kls, "best_effect": best[0], "best_coef": best[1],
           "best_kl": best[2]}
    if said:  # completions at the chosen coefficient, to read what the steering does
        row["best_completions"] = said[list(coefs).index(best[1])]
    return row


def effects(model: Model, task: Task, vectors: Sequence[SteeringVector | None], layer: int,
            coefs: list[float], settings: CompareSettings, progress: bool,
            judge: EmbeddingJudge | None) -> tuple[list[list[float]], list[list[list[str]]]]:
    """Scores ``[vector][coef]``, and for concept tasks the completions ``[vector][coef][prompt]``
    (empty for A/B tasks). A ``None`` vector (coefficient 0 only) is the model as it is, with
    any steering already in force (the SAE clamp), or a fine-tuned model as it is."""
    if task.kind == "ab":
        scores = ab_variants(model, task.items, [(v, layer) for v in vectors], coefs,
                             progress=progress)
        return scores.mean(-1).tolist(), []
    if not task.prompts or not (task.concept or task.keywords):
        raise ValueError("a concept comparison needs prompts and a concept or keywords")
    variants = [(vec, c) for vec in vectors for c in coefs]
    texts = variant_completions(model, task.prompts, variants,
                                max_new_tokens=settings.max_new_tokens, progress=progress)
    if judge is not None:
        flat = judge.scores([t for row in texts for t in row], task.concept)
        per_prompt = len(task.prompts)
        scores = [sum(flat[k * per_prompt:(k + 1) * per_prompt]) / per_prompt
                  for k in range(len(variants))]
    else:
        scores = [keyword_rate(row, task.keywords) for row in texts]
    n = len(coefs)
    return ([scores[k * n:(k + 1) * n] for k in range(len(vectors))],
            [texts[k * n:(k + 1) * n] for k in range(len(vectors))])
