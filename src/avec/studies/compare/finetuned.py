"""Fine-tuning rows of the comparison: ``lora`` and ``lora+mean_diff``, on the same pairs.

``lora``: one LoRA fine-tune per (number of pairs, seed) on the positive side of that cell's
pair subset (the same subset the steering methods fit on), with :func:`avec.studies.refusal.
finetune.finetune` (adapters merged into a plain copy of the model; the model compared on is
never changed). Training examples:

- pairs with a prompt (A/B pools: the question) train the prompt -> the positive answer
  (for A/B, the matching letter, e.g. ``(A)``);
- sentence pairs (no prompt) train a neutral everyday prompt -> the positive sentence, the
  prompts taken in turn from :data:`TRAIN_PROMPTS`, which are disjoint from the prompts the
  effect is measured on and from the KL prompts (any that coincide are dropped).

Training length is fixed in optimizer steps, not epochs, so every cell gets the same compute
whatever its number of pairs: ``lora_steps`` steps (at least one epoch) of ``min(batch, n)``
examples. Its strength knob, the analogue of a steering coefficient, is the scale ``s`` of the
learned update: weights ``W0 + s (W1 - W0)`` (``s = 1``: the model as trained, always in the
grid; ``s = 0``: the base model). Each scale is measured like a coefficient (effect, and KL
between the scaled model and the *base* model on the KL prompts); the row reports the best
effect within the KL budget and, separately, the effect and KL as trained.

``lora+mean_diff``: the fine-tuned model at each scale of that grid (0 included), steered with
the mean-difference vector of the same pairs read *on that model*, scaled to the comparison's
common norm, at each of the comparison's coefficients (0 included): a joint grid of scale x
coefficient, KL always against the base model. Its best effect within the budget is taken
over the whole grid, so it can only match or beat both the ``lora`` row (coefficient 0) and
steering alone (scale 0: the base model, where the ``mean_diff`` row of the same pairs is
reused when the comparison has one); the row says which scale and coefficient won
(``best_scale``, ``best_coef``). Choosing the scale first and steering on top would leave
nothing: the ``lora`` row's scale already sits at the edge of the budget. A larger grid also
makes the maximum over noisy scores more optimistic: a win smaller than the spread over seeds
is no win. Scales at
which the fine-tuned model alone already exceeds the KL budget are not steered on top
(``pruned_scales``): this assumes a vector that pushes the same way as the fine-tune adds KL
rather than removing it (the kept scales show whether it does: KL at each coefficient beside
KL at 0), and it about halves the grid's cost.

Cost (:mod:`~avec.studies.compare.cost`): ``lora``, the fine-tune (copy of the model,
adapters, optimizer, merge); ``lora+mean_diff``, the fine-tune plus reading the pairs on the
model at the chosen scale and fitting (at scale 0, the ``mean_diff`` row's extraction): the
training is counted even when the grid's best is at scale 0, since finding that out took it.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from avec.data.demo import CONCEPT_PROMPTS, TUNE_PROMPTS
from avec.data.pairs import ContrastPair
from avec.directions.activations import read_activations
from avec.evaluate.concepts import EmbeddingJudge
from avec.evaluate.side_effects import kl_divergence
from avec.models.model import Model
from avec.studies.compare.cost import Meter, combine
from avec.studies.compare.measure import best_row, effects, fitter, scaled, subset
from avec.studies.compare.settings import CompareSettings, Task
from avec.studies.refusal.finetune import Example, FinetuneConfig, finetune
from avec.vector import SteeringVector

FINETUNE_METHODS = ("lora", "lora+mean_diff")
"""The fine-tuning rows ``avec compare --methods`` accepts besides the steering methods."""

TRAIN_PROMPTS: list[str] = list(TUNE_PROMPTS[len(CONCEPT_PROMPTS):])
"""Prompts a sentence pair's positive text is trained as the answer to (in turn): everyday
requests, disjoint from the built-in prompts effects and KL are measured on."""


@dataclass
class BaseSweep:
    """A ``mean_diff`` row's sweep on the base model, per coefficient (0 first): what the
    combination measures at scale 0, where the fine-tuned model is the base model."""

    effects: list[float]
    kl: list[float]
    completions: list[list[str]]
    cost: dict[str, float]


def training_examples(pairs: Sequence[ContrastPair], idx: Sequence[int],
                      avoid: Sequence[str] = ()) -> list[Example]:
    """The supervised examples of a cell: the positive side of ``pairs[idx]`` (see the module
    docstring). ``avoid``: prompts the effect or the KL is measured on, never trained on."""
    chosen = [pairs[i] for i in idx]
    if all(p.prompt is not None for p in chosen):
        return [Example(p.prompt, p.positive) for p in chosen]  # type: ignore[arg-type]
    taken = set(avoid)
    prompts = [q for q in TRAIN_PROMPTS if q not in taken]
    if not prompts:
        raise ValueError("every built-in training prompt is also an evaluation or KL prompt; "
                         "pass other --prompts / --kl-prompts")
    return [Example(prompts[k % len(prompts)], p.positive) for k, p in enumerate(chosen)]


def lora_config(settings: CompareSettings, n: int, seed: int) -> FinetuneConfig:
    """``settings.lora_steps`` optimizer steps (at least one epoch) of ``min(batch, n)``
    examples each, seeded by the comparison's seed."""
    batch = min(settings.lora_batch_size, n)
    per_epoch = math.ceil(n / batch)
    return FinetuneConfig(epochs=max(1, math.ceil(settings.lora_steps / per_epoch)),
                          batch_size=batch, lora_rank=settings.lora_rank,
                          learning_rate=settings.lora_lr, seed=seed)


def lora_scales(settings: CompareSettings) -> list[float]:
    """The scale grid: 0 (the base model), then the positive scales, 1 always among them."""
    return [0.0, *sorted({float(s) for s in settings.lora_scales if s > 0} | {1.0})]


class ScaledUpdate:
    """Sets ``tuned``'s weights to ``W0 + s (W1 - W0)`` in place, ``W0`` read from ``base``
    (never written) and ``W1`` the trained weights. ``W1`` is kept aside (for the parameters
    training changed) only once a scale other than 1 is set, so a fine-tune measured only as
    trained costs no extra memory. ``s = 0`` and ``s = 1`` copy ``W0`` and ``W1`` exactly;
    other scales are computed in float32."""

    def __init__(self, base: Model, tuned: Model) -> None:
        base_params = dict(base.hf.named_parameters())
        self.changed: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for name, p in tuned.hf.named_parameters():
            w0 = base_params.get(name)
            if w0 is None or w0.shape != p.shape:
                raise ValueError(f"the fine-tuned model has parameter {name} that the base "
                                 f"model lacks or shapes differently")
            if not torch.equal(p, w0):
                self.changed.append((p, w0.detach()))
        self.trained: list[torch.Tensor] | None = None  # W1, once needed
        self.scale = 1.0

    @torch.no_grad()
    def set(self, scale: float) -> None:
        if scale == self.scale:
            return
        if self.trained is None:  # the weights are still W1: keep them before changing them
            self.trained = [p.detach().clone() for p, _ in self.changed]
        for (p, w0), w1 in zip(self.changed, self.trained):
            if scale == 1:
                p.copy_(w1)
            elif scale == 0:
                p.copy_(w0)
            else:
                p.copy_((w0.float() + scale * (w1.float() - w0.float())).to(p.dtype))
        self.scale = scale


def finetune_rows(model: Model, pairs: Sequence[ContrastPair], task: Task,
                  settings: CompareSettings, layer: int, n_grid: Sequence[int],
                  kl_prompts: Sequence[str], reference: Sequence[torch.Tensor], baseline: float,
                  unsteered: list[str], common: float, judge: EmbeddingJudge | None,
                  texts: tuple[list[str], list[str]], progress: bool = False,
                  base_steering: dict[tuple[int, int], BaseSweep] | None = None
                  ) -> list[dict[str, Any]]:
    """The ``lora`` and ``lora+mean_diff`` rows asked for in ``settings.methods``, one per
    (n, seed); ``texts`` are the pool's positive and negative texts as the steering methods
    read them. ``base_steering``: the ``mean_diff`` rows' sweeps by (n, seed), which are the
    combination's scale 0 (the base model steered by the same vector) and are reused."""
    wanted = [m for m in settings.methods if m in FINETUNE_METHODS]
    if not wanted:
        return []
    rows: list[dict[str, Any]] = []
    jobs = [(n, seed) for n in n_grid for seed in range(settings.seeds)]
    for n, seed in tqdm(jobs, desc="LoRA", disable=not progress, leave=False):
        idx = subset(len(pairs), n, seed)
        config = lora_config(settings, n, seed)
        with Meter() as train:
            trained = finetune(model, training_examples(pairs, idx, [*task.prompts, *kl_prompts]),
                               config, progress=False)
        update = ScaledUpdate(model, trained.model)
        cell = {"n_pairs": n, "seed": seed, "pairs": idx,
                "finetune": {"config": config.to_dict(), "steps": len(trained.losses),
                             "n_examples": trained.n_examples,
                             "loss_first": trained.losses[0], "loss_last": trained.losses[-1],
                             "changed_tensors": len(update.changed)}}
        run = _Cell(trained.model, update, task, settings, layer, kl_prompts, reference, judge,
                    baseline, unsteered)
        lora = run.lora_row({"method": "lora", **cell}, train)
        if "lora" in wanted:
            rows.append(lora)
        if "lora+mean_diff" in wanted:
            rows.append(run.combined_row({"method": "lora+mean_diff", **cell}, train, common,
                                         [texts[0][i] for i in idx],
                                         [texts[1][i] for i in idx], seed, lora,
                                         (base_steering or {}).get((n, seed))))
        del run, update, trained
        gc.collect()
    return rows


class _Cell:
    """One fine-tuned model (at any scale of its update) and how to measure it."""

    def __init__(self, tuned: Model, update: ScaledUpdate, task: Task, settings: CompareSettings,
                 layer: int, kl_prompts: Sequence[str], reference: Sequence[torch.Tensor],
                 judge: EmbeddingJudge | None, baseline: float, unsteered: list[str]) -> None:
        self.tuned, self.update, self.task, self.settings = tuned, update, task, settings
        self.layer, self.kl_prompts, self.reference = layer, kl_prompts, reference
        self.judge = judge
        self.baseline, self.unsteered = baseline, unsteered
        self.scales = lora_scales(settings)
        # effects, KLs and completions per scale, set by lora_row
        self.sweep: tuple[list[float], list[float], list[list[str]]] = ([], [], [])

    def lora_row(self, cell: dict[str, Any], train: Meter) -> dict[str, Any]:
        """Effect and KL (against the base) of the fine-tuned model at every scale."""
        effs, kls, said = [self.baseline], [0.0], [self.unsteered]  # scale 0: the base itself
        for s in self.scales[1:]:
            self.update.set(s)
            eff, out = effects(self.tuned, self.task, [None], self.layer, [0.0], self.settings,
                               False, self.judge)
            effs.append(eff[0][0])
            kls.append(kl_divergence(self.tuned, self.kl_prompts, None, self.layer, [0.0],
                                     reference=self.reference)[0])
            said.append(out[0][0] if out else [])
        self.sweep = (effs, kls, said)  # the combination's coefficient 0 at every scale
        row = best_row({**cell, "knob": "lora_scale"}, effs, kls,
                       said if self.unsteered else [], self.scales, self.baseline,
                       self.settings.kl_budget)
        one = self.scales.index(1.0)
        row.update(coefs=self.scales, trained_effect=effs[one] - self.baseline,
                   trained_kl=kls[one], cost={**combine(train), "train_seconds": train.seconds})
        return row

    def combined_row(self, cell: dict[str, Any], train: Meter, common: float,
                     pos_texts: list[str], neg_texts: list[str], seed: int,
                     lora: dict[str, Any], base: BaseSweep | None) -> dict[str, Any]:
        """The joint grid: at every scale whose model alone is within the budget (``lora``,
        the ``lora`` row of this fine-tune), the mean difference read on the model at that
        scale, added at every coefficient; KL against the base. Coefficient 0 at each scale is
        the ``lora`` row's measurement; scale 0, the base model, is ``base`` (the ``mean_diff``
        row of the same pairs) when given."""
        coefs = [0.0, *[float(c) for c in self.settings.coefs if c != 0]]
        n = len(pos_texts)
        grid: list[tuple[float, float]] = []
        effs: list[float] = []
        kls: list[float] = []
        said: list[list[str]] = []
        costs: dict[float, dict[str, float]] = {}
        budget = self.settings.kl_budget
        kept = [s for s, k in zip(self.scales, lora["kl"]) if s == 0 or k <= budget]
        for s in kept:
            i = self.scales.index(s)
            if s == 0 and base is not None:  # the base model steered by these pairs' vector
                eff, kl, out = base.effects, base.kl, base.completions
                costs[s] = base.cost
            else:
                self.update.set(s)
                with Meter() as read:
                    acts = read_activations(self.tuned, pos_texts + neg_texts, [self.layer],
                                            position=self.settings.position)[self.layer]
                    direction = fitter("mean_diff", self.settings, None, seed).fit(acts[:n],
                                                                                   acts[n:])
                costs[s] = {**combine(read), "read_seconds": read.seconds}
                vec = SteeringVector({self.layer: scaled(direction, common)},
                                     {"method": "lora+mean_diff", "lora_scale": s, "seed": seed})
                eff1, out1 = effects(self.tuned, self.task, [vec], self.layer, coefs[1:],
                                     self.settings, False, self.judge)
                kl1 = kl_divergence(self.tuned, self.kl_prompts, vec, self.layer, coefs[1:],
                                    reference=self.reference)
                eff = [self.sweep[0][i], *eff1[0]]  # coefficient 0: the lora row at scale s
                kl = [self.sweep[1][i], *kl1]
                out = [self.sweep[2][i], *out1[0]] if out1 else []
            for j, c in enumerate(coefs):
                grid.append((s, c))
                effs.append(eff[j])
                kls.append(kl[j])
                said.append(out[j] if out else [])
        row = best_row({**cell, "knob": "lora_scale x coef"}, effs, kls,
                       said if self.unsteered else [], grid, self.baseline,
                       self.settings.kl_budget)
        scale, coef = row["best_coef"]
        extract = costs[scale]
        row.update(grid=[list(g) for g in grid], best_scale=scale, best_coef=coef,
                   pruned_scales=[s for s in self.scales if s not in kept],
                   cost={"seconds": train.seconds + extract["seconds"],
                         "cpu_seconds": train.cpu_seconds + extract["cpu_seconds"],
                         "peak_mb": max(train.peak_mb, extract["peak_mb"]),
                         "train_seconds": train.seconds, "extract_seconds": extract["seconds"]})
        return row
