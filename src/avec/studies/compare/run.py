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
5. Cost: each cell also records what obtaining its intervention took (:mod:`~avec.studies.
   compare.cost`): wall and CPU seconds and peak extra resident memory of reading the activations of
   its own n pairs (timed on that subset alone; the fit itself uses the pool's activations,
   read once, which are the same up to float tolerance) plus the fit; ActAdd's one-pair
   extraction as a whole. The fine-tuning rows (``lora``, ``lora+mean_diff``,
   :mod:`~avec.studies.compare.finetuned`) record the training instead.

SAE methods pick one latent from the same n pairs. ``sae`` adds its decoder row like any
direction; ``sae_clamp`` clamps the latent to ``coef x common norm`` (in decoder-row units)
inside the SAE, keeping the error term, which equals adding the row at that coefficient where
the latent is off and adds less where it already fires. The SAE's own training data is
reported beside the table as an amortised cost, not counted in the pairs.
"""

from __future__ import annotations

import json
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
from avec.evaluate.concepts import EmbeddingJudge
from avec.evaluate.side_effects import kl_divergence, reference_logprobs
from avec.models.model import Model
from avec.studies.compare.cost import Meter, combine, machine
from avec.studies.compare.finetuned import FINETUNE_METHODS, BaseSweep, finetune_rows
from avec.studies.compare.measure import REGISTRY, best_row, effects, fitter, scaled, subset
from avec.studies.compare.settings import CompareResult, CompareSettings, Task
from avec.vector import SteeringVector

def _fit_cells(model: Model, pairs: Sequence[ContrastPair], settings: CompareSettings,
               layer: int, n_grid: list[int], sae: Any, pos: torch.Tensor, neg: torch.Tensor,
               latents: tuple[torch.Tensor, torch.Tensor] | None, common: float,
               texts: tuple[list[str], list[str]]
               ) -> tuple[list[dict[str, Any]], list[SteeringVector | None]]:
    """One cell per (method, n, seed): the pair subset, what the fit chose and what it cost,
    and its vector scaled to the common norm (``None`` for a method that clamps instead of
    adding)."""
    cells: list[dict[str, Any]] = []
    vectors: list[SteeringVector | None] = []
    reads: dict[tuple[int, int], Meter] = {}  # reading a subset's activations, timed once
    for name in (m for m in settings.methods if m in REGISTRY):
        for n in n_grid:
            if REGISTRY[name].pairs_needed not in (None, n):
                continue  # e.g. ActAdd, the single-pair method
            for seed in range(settings.seeds):
                idx = subset(len(pairs), n, seed)
                method = fitter(name, settings, sae, seed)
                if method.reads == "tokens":  # one pair, every position: read + fit together
                    with Meter() as fit:
                        direction = extract_actadd(model, pairs[idx[0]], [layer],
                                                   chat=settings.chat)[layer]
                    cost = combine(fit)
                else:
                    if (n, seed) not in reads:
                        reads[n, seed] = _timed_read(model, texts, idx, layer, settings)
                    with Meter() as fit:
                        if method.reads == "latents" and latents is not None:
                            direction = method.fit_latents(latents[0][idx], latents[1][idx])
                        else:
                            direction = method.fit(pos[idx], neg[idx])
                    cost = {**combine(reads[n, seed], fit), "read_seconds":
                            reads[n, seed].seconds, "fit_seconds": fit.seconds}
                vectors.append(None if method.applies == "clamp" else SteeringVector(
                    {layer: scaled(direction, common)},
                    {"method": name, "n_pairs": n, "seed": seed}))
                cells.append({"method": name, "n_pairs": n, "seed": seed, "pairs": idx,
                              **method.info(), "cost": cost})
    return cells, vectors


def _timed_read(model: Model, texts: tuple[list[str], list[str]], idx: Sequence[int],
                layer: int, settings: CompareSettings) -> Meter:
    """Read the activations of just these pairs, as extracting from them alone would, for its
    cost (the activations themselves come from the pool's single read)."""
    with Meter() as meter:
        read_activations(model, [texts[0][i] for i in idx] + [texts[1][i] for i in idx],
                         [layer], position=settings.position)
    return meter


def compare(model: Model, pairs: Sequence[ContrastPair], task: Task, settings: CompareSettings,
            kl_prompts: Sequence[str], *, progress: bool = False) -> CompareResult:
    """Run the comparison; see the module docstring for the protocol."""
    layer = model.check_layers([settings.layer])[0]
    pool = len(pairs)
    n_grid = sorted({n for n in settings.n_pairs if n <= pool})
    if not n_grid:
        raise ValueError(f"every --n-pairs value exceeds the {pool} pairs available")
    for m in settings.methods:  # validate names early
        if m not in REGISTRY and m not in FINETUNE_METHODS:
            raise ValueError(f"unknown method {m!r}; available: "
                             f"{sorted(REGISTRY) + list(FINETUNE_METHODS)}")
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
                                common, (pos_texts, neg_texts))
    coefs = [0.0, *[float(c) for c in settings.coefs if c != 0]]
    judge = EmbeddingJudge() if task.kind == "concept" and task.concept else None
    added = [v for v in vectors if v is not None]
    scores, texts = effects(model, task, added or [None], layer, coefs if added else [0.0],
                            settings, progress, judge)
    baseline = scores[0][0]
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
                           unsteered=unsteered, machine=machine())
    runs = iter(zip(scores, texts or [None] * len(scores)))
    mean_diff: dict[tuple[int, int], BaseSweep] = {}
    for cell, vec in tqdm(list(zip(cells, vectors)), desc="KL", disable=not progress,
                          leave=False):
        if vec is None:
            eff, kls, said = clamped[cell["latent"]]
            eff, said = [baseline, *eff], [unsteered, *said]
        else:
            eff, said = next(runs)
            # coefficient 0 is the unsteered model itself (bit-identical logits): its KL is 0
            kls = kl_divergence(model, kl_prompts, vec, layer, coefs[1:], reference=reference)
        result.rows.append(best_row(cell, eff, [0.0, *kls], said, coefs, baseline,
                                    settings.kl_budget))
        if cell["method"] == "mean_diff":  # lora+mean_diff at scale 0 (the base model)
            mean_diff[cell["n_pairs"], cell["seed"]] = BaseSweep(
                eff, [0.0, *kls], said or [[] for _ in coefs], cell["cost"])
    result.rows.extend(finetune_rows(model, pairs, task, settings, layer, n_grid, kl_prompts,
                                     reference, baseline, unsteered, common, judge,
                                     (pos_texts, neg_texts), progress, mean_diff))
    return result


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
            eff, texts = effects(model, task, [None], layer, [0.0], settings, False, judge)
            kls.append(kl_divergence(model, kl_prompts, None, layer, [0.0],
                                     reference=reference)[0])
        effs.append(eff[0][0])
        said.append(texts[0][0] if texts else [])
    return out


def _load_sae(settings: CompareSettings, layer: int) -> tuple[Any, dict[str, Any]]:
    """The SAE for the SAE methods, and what it cost to make (its training tokens)."""
    wanted = [m for m in settings.methods if m in REGISTRY and REGISTRY[m].needs_sae]
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
