"""The search: which layer (or band of layers) and which coefficient give the highest behaviour
score while the side effect stays within the budget.

1. **Strength scale.** Coefficients are searched as *doses*: ``dose = coef * |v_L| / |h_L|``,
   the steering's norm relative to the median norm of the residual stream at that layer (on
   the budget's neutral prompts, the first token left out), so one grid fits any vector's
   scale and any layer.
2. **Budget grid, stopped early.** For each candidate layer the budget is measured on the dose
   grid (1/16, 1/8, ..., 2), walking from 0.25 up while the budget holds, or down while it is
   blown, and stopping at the first crossing; each measurement is one batched pass over the
   budget's prompts.
3. **Bisection on the boundary.** Between the last dose within the budget and the first
   beyond it, the coefficient is bisected (geometric mean) on the budget alone, which costs
   forward passes only, at most 4 times and no more once the side effect is within 10% of the
   budget. Each layer's *frontier* is the largest coefficient found within the budget.
4. **Score at the frontier.** The behaviour score (completions, for a generation score) is
   measured at every layer's frontier in one batched pass over the held-in items; for the best
   layers also at 1/2 and 3/4 of it, in case less steering scores higher.
5. **Bands.** Around the best layer, contiguous bands of layers share the coefficient (each
   layer gets ``coef / width``); each band gets its own frontier and score.
6. **Choice and held-out check.** The highest held-in score wins (ties: the smaller side
   effect); it is measured again, with the unsteered model, on the held-out items, and a
   seeded bootstrap over those items gives an interval for the held-out effect.

Every point measured is recorded (:class:`Point`). Every point the search can choose was
measured within the budget: the choice never exceeds it on held-in points.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from avec.data.demo import NEUTRAL_PROMPTS
from avec.generation.hf import format_prompt
from avec.models.model import Model
from avec.tuning.objectives import Budget, KLBudget, Score, Variant
from avec.vector import SteeringVector

DEFAULT_DOSES = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0)
"""Steering norms from 1/16 of the residual stream's median norm to twice it."""


@dataclass
class TuneConfig:
    """How :func:`tune` searches. ``layers``: candidate layers (default: up to ``max_layers`` of
    the vector's, spread over the middle of the model); ``doses``: the grid (see the module
    docstring), walked from ``start_dose`` in steps of ``stride`` grid points; ``refine``:
    bisection steps at most, stopping once the side effect is ``close`` x the budget;
    ``fractions``: of the frontier, scored for the ``top_layers`` best layers; ``bands``: band
    widths tried around the best layer (1 = single layers only); ``held_out``: fraction of the
    score's items kept out of the search; ``bootstrap``: resamples for the held-out interval."""

    layers: Sequence[int] | None = None
    max_layers: int = 8
    doses: Sequence[float] = DEFAULT_DOSES
    start_dose: float = 0.25
    stride: int = 1
    refine: int = 4
    close: float = 0.9
    fractions: Sequence[float] = (0.5, 0.75)
    top_layers: int = 2
    bands: Sequence[int] = (3,)
    held_out: float = 1 / 3
    bootstrap: int = 1000
    seed: int = 0
    norm_prompts: Sequence[str] = tuple(NEUTRAL_PROMPTS)
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.doses or any(not (d > 0 and math.isfinite(d)) for d in self.doses):
            raise ValueError("doses must be positive finite numbers")
        if not 0 < self.held_out < 1:
            raise ValueError(f"held_out={self.held_out}: give a fraction between 0 and 1")
        if self.stride < 1 or self.refine < 0 or self.max_layers < 1:
            raise ValueError("stride and max_layers must be >= 1 and refine >= 0")
        if not (self.start_dose > 0 and math.isfinite(self.start_dose)):
            raise ValueError("start_dose must be a positive finite number")
        if any(w < 1 for w in self.bands):
            raise ValueError("band widths must be >= 1")


@dataclass
class Point:
    """One measured setting: ``coef`` on ``layers`` (a band splits it), at ``dose``; its side
    effect (``budget``), and its mean held-in score where the score was measured."""

    layers: tuple[int, ...]
    coef: float
    dose: float
    budget: float
    stage: str  # grid, bisect, frontier, fraction, band
    score: float | None = None


@dataclass
class HeldOut:
    """The chosen setting on the held-out items: unsteered and steered means, the effect and
    its bootstrap interval, and how much of the held-in effect it keeps."""

    items: int
    unsteered: float
    steered: float
    effect: float
    interval: tuple[float, float]
    kept: float | None  # held-out effect / held-in effect


@dataclass
class TuneResult:
    """The chosen setting and everything measured. ``coef`` is the setting's coefficient as
    searched: for a band it is split across the band (each layer gets ``coef / width``), which
    :attr:`layer_coef` gives: the coefficient to apply to the vector's own directions at each
    of ``layers``."""

    layers: tuple[int, ...]
    coef: float
    dose: float
    budget_value: float
    score_held_in: float
    unsteered_held_in: float
    held_out: HeldOut | None
    points: list[Point]
    frontier: dict[str, float]  # "L" or "L-M" -> frontier coefficient
    norms: dict[int, float]  # median residual-stream norm per layer
    score: dict[str, Any]
    budget: dict[str, Any]
    config: dict[str, Any]
    split: dict[str, list[int]]
    seconds: float = 0.0
    samples: dict[str, list[str]] = field(default_factory=dict)  # held-out completions

    @property
    def layer_coef(self) -> float:
        return self.coef / len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layer_coef": self.layer_coef}


def band_key(layers: Sequence[int]) -> str:
    return str(layers[0]) if len(layers) == 1 else f"{layers[0]}-{layers[-1]}"


def setting_vector(vector: SteeringVector, layers: Sequence[int]) -> SteeringVector:
    """The directions a setting adds: ``vector`` at ``layers``, each divided by the band's
    width (so a band spreads one coefficient over its layers)."""
    chosen = vector.select(list(layers))
    out = chosen * (1.0 / len(layers)) if len(layers) > 1 else chosen
    out.metadata.pop("recommended", None)
    return out


@torch.inference_mode()
def residual_norms(model: Model, prompts: Sequence[str], layers: Sequence[int]) -> dict[int, float]:
    """Median per-token norm of each layer's output (block L's output) over ``prompts``, the
    first token left out (its norm is often orders of magnitude larger)."""
    norms: dict[int, list[torch.Tensor]] = {L: [] for L in layers}
    for p in prompts:
        ids = format_prompt(model, p)[0]
        out = model.hf(input_ids=torch.tensor([ids], device=model.device),
                       output_hidden_states=True)
        for L in layers:
            h = out.hidden_states[L + 1][0, 1:].float()
            norms[L].append(h.norm(dim=-1).cpu())
    return {L: float(torch.cat(v).median()) for L, v in norms.items()}


def pick_layers(available: Sequence[int], n_layers: int, config: TuneConfig) -> list[int]:
    """``config.layers``, or up to ``max_layers`` of ``available``, evenly spread over the
    middle of the model (20%-80% of its depth; all of them when few are there)."""
    if config.layers is not None:
        missing = [L for L in config.layers if L not in available]
        if missing:
            raise ValueError(f"the vector has no layer(s) {missing}; it has {list(available)}")
        return sorted(set(int(L) for L in config.layers))
    middle = [L for L in available if 0.2 * n_layers <= L <= 0.8 * n_layers] or list(available)
    if len(middle) <= config.max_layers:
        return middle
    step = (len(middle) - 1) / (config.max_layers - 1)
    return sorted({middle[round(i * step)] for i in range(config.max_layers)})


def candidate_layers(vector: SteeringVector, model: Model, config: TuneConfig) -> list[int]:
    """:func:`pick_layers` among the vector's layers."""
    return pick_layers(vector.layers, model.n_layers, config)


def band(center: int, width: int, n_layers: int) -> tuple[int, ...]:
    """``width`` contiguous layers centred on ``center`` (empty if they leave the model)."""
    layers = tuple(range(center - width // 2, center - width // 2 + width))
    return layers if layers and layers[0] >= 0 and layers[-1] < n_layers else ()


def split_items(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``n`` items into held-in and held-out (at least one each)."""
    if n < 2:
        raise ValueError(f"the score has {n} item(s); give at least 2 (held-in and held-out)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, round(n * fraction)))
    return sorted(order[k:]), sorted(order[:k])


class _Search:
    """One run's state: the variants by setting, every point, the frontiers."""

    def __init__(self, model: Model, vector: SteeringVector, score: Score, budget: Budget,
                 config: TuneConfig, norms: dict[int, float]) -> None:
        self.model, self.vector, self.score, self.budget = model, vector, score, budget
        self.config, self.norms = config, norms
        self.points: list[Point] = []
        self.frontier: dict[tuple[int, ...], float] = {}
        self._vectors: dict[tuple[int, ...], SteeringVector] = {}

    def variant(self, layers: tuple[int, ...], coef: float) -> Variant:
        vec = self._vectors.get(layers)
        if vec is None:
            vec = self._vectors[layers] = setting_vector(self.vector, layers)
        return vec, coef

    def dose_unit(self, layers: tuple[int, ...]) -> float:
        """Coefficient per unit of dose for a setting."""
        vec = self.variant(layers, 0.0)[0]
        assert vec is not None
        steer_norm = sum(float(vec[L].float().norm()) for L in layers)  # split across the band
        scale = sum(self.norms[L] for L in layers) / len(layers)
        if steer_norm == 0:
            raise ValueError(f"the vector is zero at layer(s) {list(layers)}")
        return scale / steer_norm

    def measure_budget(self, layers: tuple[int, ...], coefs: Sequence[float], stage: str
                       ) -> list[float]:
        values = self.budget.measure(self.model, [self.variant(layers, c) for c in coefs])
        unit = self.dose_unit(layers)
        for c, v in zip(coefs, values):
            self.points.append(Point(layers, float(c), float(c) / unit, float(v), stage))
        return values

    def find_frontier(self, layers: tuple[int, ...]) -> float:
        """Steps 2-3 for one setting: the largest coefficient found within the budget."""
        unit = self.dose_unit(layers)
        grid = [d * unit for d in sorted(self.config.doses)]
        limit, stride = self.budget.limit, self.config.stride
        start = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / unit
                                                                 / self.config.start_dose)))

        seen: dict[float, float] = {0.0: 0.0}

        def within(c: float, stage: str = "grid") -> bool:
            seen[c] = self.measure_budget(layers, [c], stage)[0]
            return seen[c] <= limit

        lo: float = 0.0
        hi: float | None = None
        i = start
        if within(grid[i]):  # up the grid while the budget holds
            lo = grid[i]
            while i < len(grid) - 1:
                i = min(i + stride, len(grid) - 1)
                if not within(grid[i]):
                    hi = grid[i]
                    break
                lo = grid[i]
        else:  # down the grid until it holds
            hi = grid[i]
            while i > 0:
                i = max(i - stride, 0)
                if within(grid[i]):
                    lo = grid[i]
                    break
                hi = grid[i]
        for _ in range(self.config.refine if hi is not None else 0):
            if seen[lo] >= self.config.close * limit:
                break  # close enough to the boundary
            mid = _next_guess(lo, seen[lo], hi, seen[hi], limit, self.config.close)
            lo, hi = (mid, hi) if within(mid, "bisect") else (lo, mid)
        self.frontier[layers] = lo
        return lo

    def score_points(self, settings: Sequence[tuple[tuple[int, ...], float]], stage: str,
                     held_in: Sequence[int], unsteered: bool = False) -> Any:
        """Mean held-in score of the settings whose side effect is within the budget (measured
        here unless a point already did), scored in one batched call; with ``unsteered`` the
        unsteered model rides along and ``(scores, unsteered score)`` is returned."""
        known = {(p.layers, p.coef): p.budget for p in self.points}
        fresh = [x for x in dict.fromkeys(settings) if x[1] > 0 and x not in known]
        values = self.budget.measure(self.model, [self.variant(L, c) for L, c in fresh])
        known.update(zip(fresh, values))
        keep = [x for x in dict.fromkeys(settings)
                if x[1] > 0 and known[x] <= self.budget.limit]
        variants = [self.variant(L, c) for L, c in keep] + ([(None, 0.0)] if unsteered else [])
        scores = self.score.per_item(self.model, variants, held_in).mean(-1).tolist() \
            if variants else []
        for (layers, c), sc in zip(keep, scores):
            self.points.append(Point(layers, float(c), float(c) / self.dose_unit(layers),
                                     float(known[(layers, c)]), stage, float(sc)))
        out = dict(zip(keep, scores))
        return (out, float(scores[-1])) if unsteered else out


def _next_guess(lo: float, v_lo: float, hi: float, v_hi: float, limit: float, close: float
                ) -> float:
    """The next coefficient to measure between ``lo`` (within the budget) and ``hi`` (beyond
    it): where a power law through both points meets the middle of ``[close, 1] x limit``
    (side effects grow about as a power of the coefficient), kept inside the bracket; the
    geometric midpoint when a power law does not fit."""
    target = limit * (1 + close) / 2
    if lo > 0 and v_lo > 0 and v_hi > v_lo:
        slope = math.log(v_hi / v_lo) / math.log(hi / lo)
        guess = lo * (target / v_lo) ** (1 / slope)
    else:
        guess = math.sqrt(lo * hi) if lo > 0 else hi / 2
    span = hi / lo if lo > 0 else 2.0
    margin = span ** 0.1  # never at the bracket's very ends
    low = lo * margin if lo > 0 else hi / 16
    return min(max(guess, low), hi / margin)


def tune(model: Model, vector: SteeringVector, score: Score, budget: Budget | None = None,
         config: TuneConfig | None = None) -> TuneResult:
    """Find the layer(s) and coefficient (op ``add``, all positions) that maximise ``score``
    while ``budget`` (default: KL <= 1.0 on avec's neutral prompts) holds, and check the choice
    on held-out items. See the module docstring for the steps."""
    import time

    config = config or TuneConfig()
    budget = budget or KLBudget(prompts=list(NEUTRAL_PROMPTS), limit=1.0)
    t0 = time.perf_counter()
    vector.check_model(model)
    if len(vector.shape) != 1:
        raise ValueError("avec tune searches [d] directions; an ActAdd [T, d] block has no "
                         "layer-independent strength")
    held_in, held_out = split_items(score.n_items, config.held_out, config.seed)
    layers = candidate_layers(vector, model, config)
    bands = _bands(vector, model, layers, config)
    norms = residual_norms(model, config.norm_prompts, sorted({L for b in bands for L in b}
                                                               | set(layers)))
    search = _Search(model, vector, score, budget, config, norms)
    bar = tqdm(total=len(layers) + 3, desc="tune", disable=not config.progress, leave=False)
    for L in layers:
        search.find_frontier((L,))
        bar.update()
    # every layer at its frontier, and the unsteered model, in one batched pass
    singles = [((L,), search.frontier[(L,)]) for L in layers]
    at_frontier, base_in = search.score_points(singles, "frontier", held_in, unsteered=True)
    bar.update()
    top = [L for (L, _c), _s in sorted(at_frontier.items(), key=lambda x: -x[1])]
    top = top[:config.top_layers]
    bands_here = _bands_around(top[0][0], bands) if top else []
    for band in bands_here:  # the bands' frontiers (budget only), then one scoring pass
        search.find_frontier(band)
    bar.update()
    search.score_points([(L, search.frontier[L] * f) for L in top for f in config.fractions]
                        + [(b, search.frontier[b]) for b in bands_here], "fraction", held_in)
    for p in search.points:
        if p.stage == "fraction" and len(p.layers) > 1 and p.coef == search.frontier[p.layers]:
            p.stage = "band"
    bar.update()
    bar.close()
    chosen = _choose(search.points)
    if chosen is None:
        raise ValueError(f"no setting stayed within the budget ({budget.name} <= "
                         f"{budget.limit:g}) at the smallest dose "
                         f"{min(config.doses):g}; raise the budget or give smaller doses")
    held, texts = _held_out(model, search, score, chosen, held_out, chosen.score - base_in,
                            config)
    return TuneResult(
        layers=chosen.layers, coef=chosen.coef, dose=chosen.dose, budget_value=chosen.budget,
        score_held_in=float(chosen.score), unsteered_held_in=base_in, held_out=held,
        points=search.points, frontier={band_key(k): v for k, v in search.frontier.items()},
        norms=norms, score=score.describe(), budget=budget.describe(),
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()
                if k != "norm_prompts"},
        split={"held_in": list(held_in), "held_out": list(held_out)},
        seconds=time.perf_counter() - t0, samples=texts)


def _bands(vector: SteeringVector, model: Model, layers: Sequence[int], config: TuneConfig
           ) -> list[tuple[int, ...]]:
    """Every band the search may try (each width around each candidate layer), limited to
    layers the vector has."""
    out = []
    for w in config.bands:
        for L in layers:
            b = band(L, w, model.n_layers) if w > 1 else ()
            if b and all(x in vector.directions for x in b):
                out.append(b)
    return out


def _bands_around(layer: int, bands: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    return [b for b in bands if b[len(b) // 2] == layer]


def _choose(points: Sequence[Point]) -> Point | None:
    scored = [p for p in points if p.score is not None]
    if not scored:
        return None
    return max(scored, key=lambda p: (p.score, -p.budget))


def _held_out(model: Model, search: _Search, score: Score, chosen: Point,
              items: Sequence[int], effect_in: float, config: TuneConfig
              ) -> tuple[HeldOut, dict[str, list[str]]]:
    """The chosen setting and the unsteered model on the held-out items (and, for a
    generation score, twice the chosen coefficient, whose texts the report shows)."""
    variants = [(None, 0.0), search.variant(chosen.layers, chosen.coef)]
    if score.generates:
        variants.append(search.variant(chosen.layers, 2 * chosen.coef))
    rows = score.per_item(model, variants, items)
    kept = getattr(score, "samples", {})
    texts = {name: list(kept[(id(v), c)]) for name, (v, c) in zip(("unsteered", "1x", "2x"),
                                                                     variants)
             if (id(v), c) in kept}
    diff = rows[1] - rows[0]
    rng = random.Random(config.seed)
    boots = sorted(float(diff[[rng.randrange(len(items)) for _ in items]].mean())
                   for _ in range(config.bootstrap))
    lo = boots[int(0.025 * (len(boots) - 1))] if boots else float("nan")
    hi = boots[int(0.975 * (len(boots) - 1))] if boots else float("nan")
    effect = float(diff.mean())
    share = effect / effect_in if abs(effect_in) > 1e-12 else None
    return HeldOut(len(items), float(rows[0].mean()), float(rows[1].mean()), effect, (lo, hi),
                   share), texts


__all__ = ["DEFAULT_DOSES", "HeldOut", "Point", "TuneConfig", "TuneResult", "band", "band_key",
           "candidate_layers", "pick_layers", "residual_norms", "setting_vector", "split_items",
           "tune"]
