"""The fair method comparison: methods x number of pairs x seeds, at equal norm and KL budget.

1. Activations of every pair in the pool are read once at the layer; a (method, n, seed) cell
   fits its direction on a seeded subset of n pairs, the *same* subset for every method.
2. Every direction is scaled to one common norm (by default that of the mean-difference vector
   of the whole pool), so no method wins by being longer.
3. Each direction is swept over the coefficients; the effect is the rise of the behaviour score
   (A/B p(match)) or concept score (embedding similarity or keyword rate of greedy completions)
   over the unsteered model, and its side effect the KL divergence on neutral prompts.
4. A cell's result is its best effect among the coefficients whose KL stays within the budget
   (coefficient 0, no effect, is always within it).

SAE methods pick one latent from the same n pairs. ``sae`` adds its decoder row like any
direction; ``sae_clamp`` clamps the latent to ``coef x common norm`` (in decoder-row units)
inside the SAE, keeping the error term, which equals adding the row at that coefficient where
the latent is off and adds less where it already fires. The SAE's own training data is
reported beside the table as an amortised cost, not counted in the pairs.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from avec._version import __version__
from avec.data.pairs import ContrastPair
from avec.data.templates import pair_texts
from avec.directions.activations import read_activations
from avec.directions.extract import extract_actadd
from avec.directions.methods import METHODS
from avec.directions.methods.base import Method, make_method
from avec.evaluate.ab import ab_variants
from avec.evaluate.concepts import EmbeddingJudge, keyword_rate
from avec.evaluate.side_effects import kl_divergence, reference_logprobs
from avec.generation.hf import variant_completions
from avec.models.model import Model
from avec.sae.feature import SAE_METHODS
from avec.studies.compare.settings import CompareResult, CompareSettings, Task
from avec.vector import SteeringVector

REGISTRY: dict[str, type] = {**METHODS, **SAE_METHODS}
"""Every method ``avec compare`` runs: the core ones and the SAE-feature ones."""


def _scaled(direction: torch.Tensor, norm: float) -> torch.Tensor:
    if direction.dim() == 2:  # ActAdd block: mean row norm = the common norm
        current = direction.norm(dim=-1).mean()
    else:
        current = direction.norm()
    if current == 0:
        raise ValueError("a method returned the zero direction; it cannot be scaled")
    return direction * (norm / current)


def _subset(pool: int, n: int, seed: int) -> list[int]:
    return random.Random(10_007 * seed + n).sample(range(pool), n)


def _method(name: str, settings: CompareSettings, sae: Any, seed: int) -> Method:
    return make_method(REGISTRY, name, context={"seed": seed, "sae": sae,
                                                 "by": settings.sae_select})


def _fit_cells(model: Model, pairs: Sequence[ContrastPair], settings: CompareSettings,
               layer: int, n_grid: list[int], sae: Any, pos: torch.Tensor, neg: torch.Tensor,
               latents: tuple[torch.Tensor, torch.Tensor] | None, common: float
               ) -> tuple[list[dict[str, Any]], list[SteeringVector | None]]:
    """One cell per (method, n, seed): the pair subset and what the fit chose, and its vector
    scaled to the common norm (``None`` for a method that clamps instead of adding)."""
    cells: list[dict[str, Any]] = []
    vectors: list[SteeringVector | None] = []
    for name in settings.methods:
        for n in n_grid:
            if REGISTRY[name].pairs_needed not in (None, n):
                continue  # e.g. ActAdd, the single-pair method
            for seed in range(settings.seeds):
                idx = _subset(len(pairs), n, seed)
                fitter = _method(name, settings, sae, seed)
                if fitter.reads == "tokens":  # one pair, every position
                    direction = extract_actadd(model, pairs[idx[0]], [layer],
                                               chat=settings.chat)[layer]
                elif fitter.reads == "latents" and latents is not None:
                    direction = fitter.fit_latents(latents[0][idx], latents[1][idx])
                else:
                    direction = fitter.fit(pos[idx], neg[idx])
                vectors.append(None if fitter.applies == "clamp" else SteeringVector(
                    {layer: _scaled(direction, common)},
                    {"method": name, "n_pairs": n, "seed": seed}))
                cells.append({"method": name, "n_pairs": n, "seed": seed, "pairs": idx,
                              **fitter.info()})
    return cells, vectors


def compare(model: Model, pairs: Sequence[ContrastPair], task: Task, settings: CompareSettings,
            kl_prompts: Sequence[str], *, progress: bool = False) -> CompareResult:
    """Run the comparison; see the module docstring for the protocol."""
    layer = model.check_layers([settings.layer])[0]
    pool = len(pairs)
    n_grid = sorted({n for n in settings.n_pairs if n <= pool})
    if not n_grid:
        raise ValueError(f"every --n-pairs value exceeds the {pool} pairs available")
    for m in settings.methods:  # validate names early
        if m not in REGISTRY:
            raise ValueError(f"unknown method {m!r}; available: {sorted(REGISTRY)}")
    sae, sae_info = _load_sae(settings, layer)
    pos_texts, neg_texts = pair_texts(list(pairs), model, chat=settings.chat)
    acts = read_activations(model, pos_texts + neg_texts, [layer], position=settings.position,
                            progress=progress)[layer]
    pos, neg = acts[:pool], acts[pool:]
    common = settings.norm or float((pos - neg).mean(0).norm())
    latents = None
    if sae is not None and settings.position == "mean":  # latents per token, averaged per text
        from avec.sae.evaluate import text_latents

        both = text_latents(model, sae, layer, pos_texts + neg_texts, "mean")
        latents = (both[:pool], both[pool:])
    cells, vectors = _fit_cells(model, pairs, settings, layer, n_grid, sae, pos, neg, latents,
                                common)
    coefs = [0.0, *[float(c) for c in settings.coefs if c != 0]]
    judge = EmbeddingJudge() if task.kind == "concept" and task.concept else None
    added = [v for v in vectors if v is not None]
    effects, texts = _effects(model, task, added or [None], layer, coefs if added else [0.0],
                              settings, progress, judge)
    baseline = effects[0][0]
    unsteered = texts[0][0] if texts else []
    reference = reference_logprobs(model, kl_prompts)
    clamped = _clamp_runs(model, task, sae, layer, {c["latent"] for c, v in zip(cells, vectors)
                                                    if v is None},
                          coefs[1:], common, settings, kl_prompts, reference, judge, progress)
    result = CompareResult(settings={**asdict(settings), "coefs": coefs},
                           task={"kind": task.kind, "name": task.name, "n_items": len(task.items),
                                 "n_prompts": len(task.prompts), "concept": task.concept,
                                 "keywords": list(task.keywords), "pool_pairs": pool,
                                 "pairs_source": task.pairs_source,
                                 "kl_prompts": len(kl_prompts), **sae_info},
                           baseline=baseline, common_norm=common, model=model.identity(),
                           avec_version=__version__, prompts=list(task.prompts),
                           unsteered=unsteered)
    runs = iter(zip(effects, texts or [None] * len(effects)))
    for cell, vec in tqdm(list(zip(cells, vectors)), desc="KL", disable=not progress,
                          leave=False):
        if vec is None:
            eff, kls, said = clamped[cell["latent"]]
            eff, said = [baseline, *eff], [unsteered, *said]
        else:
            eff, said = next(runs)
            # coefficient 0 is the unsteered model itself (bit-identical logits): its KL is 0
            kls = kl_divergence(model, kl_prompts, vec, layer, coefs[1:], reference=reference)
        result.rows.append(_best(cell, eff, [0.0, *kls], said, coefs, baseline,
                                 settings.kl_budget))
    return result


def _best(cell: dict[str, Any], eff: list[float], kls: list[float], said: Any,
          coefs: list[float], baseline: float, budget: float) -> dict[str, Any]:
    """A cell's row: its effects and KLs per coefficient and the best effect within budget."""
    ok = [(e - baseline, c, k) for e, c, k in zip(eff, coefs, kls) if k <= budget]
    best = max(ok, key=lambda x: x[0])  # coefficient 0 is always within budget
    row = {**cell, "effects": eff, "kl": kls, "best_effect": best[0], "best_coef": best[1],
           "best_kl": best[2]}
    if said:  # completions at the chosen coefficient, to read what the steering does
        row["best_completions"] = said[coefs.index(best[1])]
    return row


def _clamp_runs(model: Model, task: Task, sae: Any, layer: int, latents: set[int],
                coefs: list[float], common: float, settings: CompareSettings,
                kl_prompts: Sequence[str], reference: Sequence[torch.Tensor],
                judge: EmbeddingJudge | None, progress: bool
                ) -> dict[int, tuple[list[float], list[float], list[list[str]]]]:
    """For each latent: scores, KLs and (concept tasks) completions with the latent clamped to
    ``c * common / |W_dec[latent]|`` for every nonzero coefficient ``c``, inside the SAE with
    its error term kept. Where the latent is off this adds the decoder row at the same norm as
    an added direction at coefficient ``c``; where it already fires, it adds only the rest."""
    from avec.sae.steer import steer_features

    out: dict[int, tuple[list[float], list[float], list[list[str]]]] = {}
    jobs = [(latent, c) for latent in sorted(latents) for c in coefs]
    for latent, c in tqdm(jobs, desc="SAE clamp", disable=not progress, leave=False):
        effs, kls, said = out.setdefault(latent, ([], [], []))
        value = c * common / float(sae.W_dec[latent].detach().norm())
        with steer_features(model, sae, layer, clamp={latent: value}):
            eff, texts = _effects(model, task, [None], layer, [0.0], settings, False, judge)
            kls.append(kl_divergence(model, kl_prompts, None, layer, [0.0],
                                     reference=reference)[0])
        effs.append(eff[0][0])
        said.append(texts[0][0] if texts else [])
    return out


def _load_sae(settings: CompareSettings, layer: int) -> tuple[Any, dict[str, Any]]:
    """The SAE for the SAE methods, and what it cost to make (its training tokens)."""
    wanted = [m for m in settings.methods if REGISTRY[m].needs_sae]
    if not wanted:
        return None, {}
    if not settings.sae:
        raise ValueError(f"the {wanted} method(s) need an SAE: pass --sae DIR (from `avec sae "
                         f"train` or a SAELens directory) trained at the comparison's layer")
    from avec.sae.io import load_sae

    sae = load_sae(settings.sae)
    site = sae.cfg.avec_layer
    if site is not None and site != layer:
        raise ValueError(f"the SAE in {settings.sae} reads layer {site}, but the comparison "
                         f"steers layer {layer}; pass --layer {site}")
    info: dict[str, Any] = {"sae": {"path": str(settings.sae), "d_sae": sae.d_sae,
                                    "k": sae.cfg.k, "select": settings.sae_select}}
    record = Path(settings.sae) / "train.json"
    if record.is_file():
        train = json.loads(record.read_text())
        info["sae"]["training_tokens"] = train.get("n_tokens") or train.get("tokens")
        info["sae"]["training_seconds"] = train.get("seconds")
    return sae, info


def _effects(model: Model, task: Task, vectors: Sequence[SteeringVector | None], layer: int,
             coefs: list[float], settings: CompareSettings, progress: bool,
             judge: EmbeddingJudge | None) -> tuple[list[list[float]], list[list[list[str]]]]:
    """Scores ``[vector][coef]``, and for concept tasks the completions ``[vector][coef][prompt]``
    (empty for A/B tasks). A ``None`` vector (coefficient 0 only) is the model as it is, with
    any steering already in force (the SAE clamp)."""
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
